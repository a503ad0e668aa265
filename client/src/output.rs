//! Tables for people, JSON for scripts.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

/// Prints `value` as JSON, or as a table of `columns` (JSON field names) when it is a list
/// (`{"items": [...]}`) or a single object.
pub fn print(value: &Value, columns: &[&str], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<&Value> = match value.get("items").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None => vec![value],
    };
    println!("{}", table(&rows, columns));
}

/// A table with one row per object.
pub fn table(rows: &[&Value], columns: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(columns.iter().map(|c| c.to_uppercase()));
    for row in rows {
        t.add_row(columns.iter().map(|c| {
            if is_time_column(c) {
                time_cell(row.get(*c))
            } else {
                cell(row.get(*c))
            }
        }));
    }
    t
}

/// Columns that hold seconds since the Unix epoch.
fn is_time_column(c: &str) -> bool {
    c.ends_with("_at") || c == "not_after" || c == "not_before" || c == "last_seen"
}

/// Seconds since the Unix epoch as a UTC date and time (`2026-12-02 22:58Z`); other
/// values as [`cell`] shows them.
pub fn time_cell(v: Option<&Value>) -> String {
    match v.and_then(Value::as_i64) {
        Some(t) if t > 0 => match jiff::Timestamp::from_second(t) {
            Ok(ts) => ts.strftime("%Y-%m-%d %H:%MZ").to_string(),
            Err(_) => t.to_string(),
        },
        _ => cell(v),
    }
}

/// A JSON value as a short cell.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Object(o)) => {
            // Single-key objects are enum variants: `{"tcp":{"port":5432}}` reads `tcp 5432`.
            if o.len() == 1 {
                let (k, v) = o.iter().next().expect("one entry");
                let inner = match v {
                    Value::Object(m) => m
                        .values()
                        .filter(|x| !x.is_null())
                        .map(|x| cell(Some(x)))
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => cell(Some(other)),
                };
                format!("{k} {inner}")
            } else {
                serde_json::to_string(o).unwrap_or_default()
            }
        }
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cells_read_naturally() {
        assert_eq!(cell(Some(&json!({"tcp": {"port": 5432}}))), "tcp 5432");
        assert_eq!(
            cell(Some(
                &json!({"http": {"domain": "a.b", "path_prefix": null}})
            )),
            "http a.b"
        );
        assert_eq!(
            cell(Some(
                &json!({"private": {"address": "db.internal", "ports": "5432",
                "protocols": ["tcp"], "alias": "pg", "virtual_address": "100.100.0.1"}})
            )),
            "private db.internal pg 5432 tcp 100.100.0.1"
        );
        assert_eq!(cell(Some(&json!(["a", "b"]))), "a,b");
        assert_eq!(cell(None), "-");
        assert_eq!(time_cell(Some(&json!(1_764_716_280))), "2025-12-02 22:58Z");
        assert_eq!(time_cell(Some(&json!(0))), "0");
    }
}
