//! The pages the proxy answers with itself: errors and who-am-I. They say what is wrong
//! in words a user can act on and never show upstream addresses or internal errors.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use super::Body;

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An HTML page with `status`, a title and a sentence (both escaped here).
pub fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\
         <body style=\"font-family:sans-serif;margin:3em;max-width:40em\"><h1>{title}</h1>\
         <p id=\"detail\">{detail}</p><p style=\"color:#666\">{code} &middot; Warren</p></body></html>\n",
        code = status.as_u16(),
        title = esc(title),
        detail = esc(detail),
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .body(full(html))
        .expect("a valid response")
}

/// A redirect (302) to `location`.
pub fn redirect(location: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(Bytes::new()))
        .unwrap_or_else(|_| {
            page(
                StatusCode::BAD_REQUEST,
                "Bad redirect",
                "The address to go to is not valid.",
            )
        })
}
