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

/// The one stylesheet of every page the proxy serves itself (sign-in, provider chooser,
/// PIN/passcode, denied, error, sign-out): inline, no external assets (fonts, images,
/// scripts), readable in light and dark mode, at any width, with visible focus.
const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1b1f24;--muted:#57606a;--bg:#f6f8fa;--card:#fff;--line:#d0d7de;--accent:#0b5cad;--on-accent:#fff}\
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9da7b3;--bg:#0d1117;--card:#161b22;--line:#30363d;--accent:#4493f8;--on-accent:#0d1117}}\
*{box-sizing:border-box}\
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;padding:1.5rem;\
background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}\
main{width:100%;max-width:28rem;background:var(--card);border:1px solid var(--line);border-radius:12px;padding:2rem}\
h1{font-size:1.4rem;margin:0 0 .75rem}\
p{margin:.5rem 0}\
.muted,footer{color:var(--muted)}\
footer{font-size:.85rem;margin-top:1.5rem;border-top:1px solid var(--line);padding-top:.75rem}\
ul.choices{list-style:none;padding:0;margin:1rem 0}\
ul.choices li{margin:.5rem 0}\
a.button,button{display:inline-block;width:100%;text-align:center;padding:.65rem 1rem;border-radius:8px;\
border:1px solid var(--accent);background:var(--accent);color:var(--on-accent);font:inherit;text-decoration:none;cursor:pointer}\
a.button.secondary,button.secondary{background:transparent;color:var(--accent)}\
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin-top:1.25rem}\
.actions>*{flex:1 1 10rem;display:flex;align-items:center;justify-content:center}\
.actions>a.button{display:flex}\
form{margin:1rem 0}\
label{display:block;margin:.5rem 0}\
input{display:block;width:100%;margin-top:.25rem;padding:.55rem;border:1px solid var(--line);border-radius:6px;background:var(--bg);color:var(--fg);font:inherit}\
a{color:var(--accent)}\
:focus-visible{outline:3px solid var(--accent);outline-offset:2px}";

tokio::task_local! {
    /// The cluster's title while the proxy handles a request (set around each request
    /// from the state it reads), for [`document`]: no page-making function needs to be
    /// handed it.
    pub static CLUSTER_TITLE: Option<std::sync::Arc<str>>;
}

/// A whole page in the one design: `title` (escaped here) as the heading and the
/// document's title, then `body` (HTML, escaped by the caller), then the footer, which
/// names the cluster by its title ("Warren" when it has none).
pub fn document(title: &str, body: &str) -> String {
    let cluster = CLUSTER_TITLE
        .try_with(|t| t.as_deref().map(esc))
        .ok()
        .flatten()
        .unwrap_or_else(|| "Warren".to_owned());
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} \u{b7} {cluster}</title><style>{STYLE}</style></head>\
         <body><main><h1>{title}</h1>{body}<footer id=\"cluster\">{cluster}</footer></main></body></html>\n",
        title = esc(title),
    )
}

/// Links under a page's text, like "Sign out" on the denied page: `(href, label)`, the
/// first the main one. Both escaped here.
pub fn actions(links: &[(&str, &str)]) -> String {
    let mut out = String::from("<div class=\"actions\">");
    for (i, (href, label)) in links.iter().enumerate() {
        let class = if i == 0 { "button" } else { "button secondary" };
        out.push_str(&format!(
            "<a class=\"{class}\" href=\"{}\">{}</a>",
            esc(href),
            esc(label)
        ));
    }
    out.push_str("</div>");
    out
}

/// An HTML response in the one design, with the headers every such page has: not cached,
/// not sniffed, never framed, and nothing loaded from anywhere.
pub fn html_response(status: StatusCode, html: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'",
        )
        .header("x-frame-options", "DENY")
        .body(full(html))
        .expect("a valid response")
}

/// An HTML page with `status`, a title and a sentence (both escaped here).
pub fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    page_with(status, title, detail, &[])
}

/// [`page`] with links under the sentence (see [`actions`]).
pub fn page_with(
    status: StatusCode,
    title: &str,
    detail: &str,
    links: &[(&str, &str)],
) -> Response<Body> {
    let mut body = format!(
        "<p id=\"detail\">{}</p><p class=\"muted\">HTTP {}</p>",
        esc(detail),
        status.as_u16()
    );
    if !links.is_empty() {
        body.push_str(&actions(links));
    }
    html_response(status, document(title, &body))
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
