//! The API's routes: the one table the router, the metric labels and the
//! span names read.

// Each path is written once, in these macros: the constants and the span
// names below are made from them.
macro_rules! tokens_path {
    () => {
        "/v1/tokens"
    };
}
macro_rules! vendor_path {
    () => {
        "/ext/get-user-token"
    };
}
macro_rules! openapi_path {
    () => {
        "/openapi.json"
    };
}

/// The native token API.
pub const TOKENS_ROUTE: &str = tokens_path!();
/// The drop-in route, same as the vendor's.
pub const VENDOR_ROUTE: &str = vendor_path!();
/// The OpenAPI document.
pub const OPENAPI_ROUTE: &str = openapi_path!();

/// Every route, as the `route` label names it.
pub const ROUTES: [&str; 3] = [TOKENS_ROUTE, VENDOR_ROUTE, OPENAPI_ROUTE];

/// The methods each route answers, with the span name OpenTelemetry gives a
/// request to it: `{method} {route}`.
pub const SPAN_NAMES: [(&str, &str, &str); 4] = [
    ("GET", TOKENS_ROUTE, concat!("GET ", tokens_path!())),
    ("DELETE", TOKENS_ROUTE, concat!("DELETE ", tokens_path!())),
    ("GET", VENDOR_ROUTE, concat!("GET ", vendor_path!())),
    ("GET", OPENAPI_ROUTE, concat!("GET ", openapi_path!())),
];

/// The methods a known route serves, as its 405's `Allow` lists them: the
/// token routes refuse `HEAD` (it would run a lookup and an audit for an
/// answer nobody reads); the document is served to `HEAD` as well.
pub fn allowed_methods(route: &str) -> Option<&'static str> {
    match route {
        TOKENS_ROUTE => Some("GET, DELETE"),
        VENDOR_ROUTE => Some("GET"),
        OPENAPI_ROUTE => Some("GET, HEAD"),
        _ => None,
    }
}

/// The `route` label of a path: a known route or `unmatched`, so labels stay
/// a closed set.
pub fn label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|route| **route == path)
        .copied()
        .unwrap_or("unmatched")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_are_method_and_route_of_known_routes() {
        for (method, route, name) in SPAN_NAMES {
            assert!(ROUTES.contains(&route));
            assert_eq!(name, format!("{method} {route}"));
        }
        for route in ROUTES {
            let allowed = allowed_methods(route).unwrap();
            for (method, r, _) in SPAN_NAMES {
                if r == route {
                    assert!(allowed.contains(method), "{route} serves {method}");
                }
            }
        }
        assert_eq!(label("/v1/tokens"), TOKENS_ROUTE);
        assert_eq!(label("/v1/tokens/"), "unmatched");
    }
}
