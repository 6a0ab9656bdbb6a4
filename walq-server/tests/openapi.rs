//! `GET /openapi.json`: the data plane's OpenAPI document is served, is a
//! structurally valid OpenAPI 3 document, and describes every route the
//! router serves (and nothing it does not).
//!
//! Method: the route list is derived from the code, not restated here: the
//! router's source (`src/api.rs`) registers every route through
//! `utoipa_axum::routes!(handler, ...)`, from each handler's
//! `#[utoipa::path]`; the test reads that source, requires every
//! registration to go through `routes!` (a bare `.route(` would serve a path
//! the document does not know), and requires every handler named there, and
//! every `#[utoipa::path]` handler, to be an operation of the document. Then
//! it asks the running server: every documented method of every documented
//! path is routed (never `no_route`, never 405), every other method of those
//! paths is 405.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

mod common;

use common::{TestResult, code, start};

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The source of the router and handlers.
const API_SOURCE: &str = include_str!("../src/api.rs");

/// The body of `fn NAME` in `source`: from its `{` to the matching `}`.
fn fn_body<'a>(source: &'a str, name: &str) -> &'a str {
    let start = source.find(&format!("fn {name}(")).unwrap_or_else(|| panic!("no fn {name} in api.rs"));
    let open = start + source[start..].find('{').expect("a body");
    let mut depth = 0;
    for (i, c) in source[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &source[open..=open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced fn {name}");
}

/// The handlers the router registers, from `routes!(...)` in `fn documented`.
fn routed_handlers() -> Vec<String> {
    let body = fn_body(API_SOURCE, "documented");
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("routes!(") {
        let args = &rest[i + "routes!(".len()..];
        let end = args.find(')').expect("routes!( closes");
        out.extend(args[..end].split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
        rest = &args[end..];
    }
    out
}

/// The handlers that carry a `#[utoipa::path(...)]`.
fn path_handlers() -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = API_SOURCE;
    while let Some(i) = rest.find("#[utoipa::path(") {
        rest = &rest[i + 1..];
        let f = rest.find("async fn ").expect("a handler after #[utoipa::path]");
        let name: String =
            rest[f + "async fn ".len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        out.push(name);
    }
    out
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            if METHODS.contains(&method.as_str()) {
                out.push((path.clone(), method.clone(), op));
            }
        }
    }
    out
}

/// Resolves a local `$ref` (`#/a/b`) in the document.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// Every `$ref` anywhere in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// Every `pattern` anywhere in `v`.
fn patterns(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(p)) = m.get("pattern") {
                out.push(p.clone());
            }
            m.values().for_each(|x| patterns(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| patterns(x, out)),
        _ => {}
    }
}

/// The structural rules of OpenAPI 3 a generator could break: required
/// fields, path templates matched by required path parameters, response
/// keys, unique operation ids and parameters, resolvable references, and
/// patterns that compile. Returns the problems found.
fn structural_problems(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |p: String| problems.push(p);
    match doc["openapi"].as_str() {
        Some(v) if v.starts_with("3.") => {}
        other => problem(format!("openapi: {other:?} is not 3.x")),
    }
    if !doc["info"]["title"].is_string() || !doc["info"]["version"].is_string() {
        problem("info needs a title and a version".into());
    }
    let Some(paths) = doc["paths"].as_object() else {
        problem("no paths object".into());
        return problems;
    };
    let mut operation_ids = BTreeSet::new();
    for (path, item) in paths {
        if !path.starts_with('/') {
            problem(format!("path {path:?} does not start with /"));
        }
        let templated: BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(String::from)
            .collect();
        for (method, op) in item.as_object().expect("a path item") {
            if !METHODS.contains(&method.as_str()) {
                problem(format!("{path}: {method:?} is not an HTTP method of OpenAPI"));
                continue;
            }
            let at = format!("{} {path}", method.to_uppercase());
            match op["operationId"].as_str() {
                Some(id) if operation_ids.insert(id.to_string()) => {}
                Some(id) => problem(format!("{at}: operationId {id} is used twice")),
                None => problem(format!("{at}: no operationId")),
            }
            let mut seen = BTreeSet::new();
            let mut in_path = BTreeSet::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let p = p.get("$ref").and_then(Value::as_str).and_then(|r| resolve(doc, r)).unwrap_or(p);
                let (Some(name), Some(place)) = (p["name"].as_str(), p["in"].as_str()) else {
                    problem(format!("{at}: a parameter without name or in"));
                    continue;
                };
                if !["query", "header", "path", "cookie"].contains(&place) {
                    problem(format!("{at}: parameter {name} in {place:?}"));
                }
                if !seen.insert((name.to_ascii_lowercase(), place)) {
                    problem(format!("{at}: parameter {name} in {place} twice"));
                }
                if p.get("schema").is_none() && p.get("content").is_none() {
                    problem(format!("{at}: parameter {name} has neither schema nor content"));
                }
                if place == "path" {
                    if p["required"] != Value::Bool(true) {
                        problem(format!("{at}: path parameter {name} is not required"));
                    }
                    in_path.insert(name.to_string());
                }
            }
            if in_path != templated {
                problem(format!("{at}: path parameters {in_path:?}, template {templated:?}"));
            }
            if let Some(body) = op.get("requestBody")
                && body.get("$ref").is_none()
                && body["content"].as_object().is_none_or(|c| c.is_empty())
            {
                problem(format!("{at}: a requestBody without content"));
            }
            let Some(responses) = op["responses"].as_object().filter(|r| !r.is_empty()) else {
                problem(format!("{at}: no responses"));
                continue;
            };
            for (status, response) in responses {
                let valid_key = status == "default"
                    || status.parse::<u16>().is_ok_and(|s| (100..600).contains(&s))
                    || ["1XX", "2XX", "3XX", "4XX", "5XX"].contains(&status.as_str());
                if !valid_key {
                    problem(format!("{at}: response key {status:?}"));
                }
                let response = match response.get("$ref").and_then(Value::as_str) {
                    Some(r) => resolve(doc, r).unwrap_or(&Value::Null),
                    None => response,
                };
                if !response["description"].is_string() {
                    problem(format!("{at}: response {status} has no description"));
                }
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    if content.get("schema").is_none() {
                        problem(format!("{at}: response {status} {media} has no schema"));
                    }
                }
                // A link names an operation that exists, and parameters it has.
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    let target = link["operationId"].as_str().and_then(|id| {
                        operations(doc).into_iter().find(|(_, _, op)| op["operationId"] == id)
                    });
                    let Some((_, _, target)) = target else {
                        problem(format!("{at}: link {name} names no operation"));
                        continue;
                    };
                    for param in link["parameters"].as_object().into_iter().flatten().map(|(k, _)| k) {
                        let known = target["parameters"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|p| p["name"] == *param);
                        if !known {
                            problem(format!(
                                "{at}: link {name} passes {param}, which its operation does not take"
                            ));
                        }
                    }
                }
            }
        }
    }
    let mut all = Vec::new();
    refs(doc, &mut all);
    for r in all {
        if !r.starts_with("#/") || resolve(doc, &r).is_none() {
            problem(format!("$ref {r} does not resolve"));
        }
    }
    let mut all = Vec::new();
    patterns(doc, &mut all);
    for p in all {
        if let Err(e) = regex::Regex::new(&p) {
            problem(format!("pattern {p:?} does not compile: {e}"));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_and_is_openapi_3() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let r = s.http.get(s.url("/openapi.json")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served: Value = serde_json::from_slice(&r.bytes().await?)?;
    // What is served is what the code generates.
    assert_eq!(served, walq_server::openapi());
    let problems = structural_problems(&served);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
    // The shared pieces: one error body, its codes, Retry-After on 429 and 503.
    let codes = served["components"]["schemas"]["ErrorCode"]["enum"].as_array().expect("the error codes");
    for c in ["bad_request", "queue_not_found", "no_route", "shutting_down", "record_too_large"] {
        assert!(codes.contains(&Value::from(c)), "{c}");
    }
    for response in ["TooMany", "Unavailable"] {
        assert!(
            served["components"]["responses"][response]["headers"]["Retry-After"].is_object(),
            "{response}"
        );
    }
    // The produce's headers and body are described.
    let produce = &served["paths"]["/v1/queues/{queue}/records"]["post"];
    let headers: BTreeSet<&str> = produce["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "header")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for h in [
        walq_server::headers::KEY,
        walq_server::headers::HEADER,
        walq_server::headers::DURABILITY,
        walq_server::headers::TIMESTAMP,
        walq_server::headers::REPLY_TO,
        walq_server::headers::CORRELATION_ID,
    ] {
        assert!(headers.contains(h), "{h} is not documented on the produce");
    }
    assert!(produce["requestBody"]["content"]["application/octet-stream"].is_object());
    let batch = &served["paths"]["/v1/queues/{queue}/batch"]["post"];
    assert!(batch["requestBody"]["content"]["application/json"].is_object());
    s.stop().await;
    Ok(())
}

#[test]
fn the_structural_check_finds_broken_documents() {
    let good = walq_server::openapi();
    assert_eq!(structural_problems(&good), Vec::<String>::new());
    let mut bad = good.clone();
    bad["openapi"] = "2.0".into();
    assert_eq!(structural_problems(&bad).len(), 1);
    let mut bad = good.clone();
    let params = bad["paths"]["/v1/queues/{queue}"]["get"]["parameters"].as_array_mut().unwrap();
    params.retain(|p| p["in"] != "path");
    assert!(structural_problems(&bad)[0].contains("template"), "{:?}", structural_problems(&bad));
    let mut bad = good.clone();
    bad["paths"]["/v1/queues"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] =
        serde_json::json!({"$ref": "#/components/schemas/Nope"});
    assert!(structural_problems(&bad)[0].contains("Nope"));
    let mut bad = good.clone();
    bad["paths"]["/v1/queues/{queue}/groups/{group}/fetch"]["post"]["responses"]["200"]["links"]["Settle"]
        ["operationId"] = "nope".into();
    assert!(structural_problems(&bad)[0].contains("names no operation"), "{:?}", structural_problems(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_route_is_served() -> TestResult {
    // From the source: every registration goes through routes!, and names
    // handlers the document has.
    for f in ["documented", "router"] {
        let body = fn_body(API_SOURCE, f);
        for bare in [".route(", ".route_service(", ".nest(", ".nest_service(", ".merge("] {
            assert!(
                !body.contains(bare),
                "fn {f} in api.rs registers a route with {bare}: register it with routes!(handler) and a #[utoipa::path] instead"
            );
        }
    }
    let routed = routed_handlers();
    let annotated = path_handlers();
    assert!(routed.len() >= 20, "the router's handlers were not found: {routed:?}");
    let doc = walq_server::openapi();
    let ops = operations(&doc);
    let ids: BTreeSet<&str> = ops.iter().map(|(_, _, op)| op["operationId"].as_str().unwrap()).collect();
    for h in &routed {
        assert!(ids.contains(h.as_str()), "the routed handler {h} is not in the document");
    }
    for h in &annotated {
        assert!(routed.contains(h), "the handler {h} has a #[utoipa::path] but is not routed");
    }
    assert_eq!(ids.len(), routed.len(), "operations {ids:?}, routed handlers {routed:?}");

    // From the running server: each documented method of each documented
    // path is routed; every other method of those paths is 405.
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("q", "x").await;
    let mut by_path: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (path, method, _) in &ops {
        by_path.entry(path.as_str()).or_default().insert(method.to_uppercase());
    }
    let mut shutdown_last = None;
    for (path, methods) in &by_path {
        let url = s.url(
            &path
                .replace("{queue}", "q")
                .replace("{consumer}", "c")
                .replace("{group}", "g")
                .replace("{id}", "0.1")
                .replace("{action}", "ack"),
        );
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if *path == "/v1/shutdown" && method == "POST" {
                shutdown_last = Some(url.clone());
                continue;
            }
            let r = s.http.request(method.parse()?, &url).send().await?;
            let status = r.status().as_u16();
            let body = r.bytes().await?;
            if methods.contains(method) {
                assert_ne!(status, 405, "{method} {path} is documented but not routed");
                if status == 404 {
                    let v: Value = serde_json::from_slice(&body)?;
                    assert_ne!(code(&v), "no_route", "{method} {path} is documented but not routed");
                }
            } else {
                assert_eq!(status, 405, "{method} {path} is routed but not documented");
            }
        }
    }
    let r = s.http.post(shutdown_last.expect("POST /v1/shutdown is documented")).send().await?;
    assert_eq!(r.status(), 202);
    s.task.await??;
    Ok(())
}

/// The patterns of the durability and start grammars: what they accept the
/// server parses (so a client generated from the document sends nothing
/// the server refuses), and they refuse what the server refuses.
#[test]
fn the_grammar_patterns_match_the_parsers() {
    let doc = walq_server::openapi();
    let pattern = |name: &str| {
        regex::Regex::new(doc["components"]["schemas"][name]["pattern"].as_str().expect("a pattern")).unwrap()
    };
    let durability = pattern("Durability");
    for (text, ok) in [
        ("sync", true),
        ("os", true),
        ("interval", true),
        ("interval:1", true),
        ("interval:250ms", true),
        ("interval:999999", true),
        ("interval:1000000", true),
        ("interval:2999999", true),
        ("interval:3599999", true),
        ("interval:3600000", true),
        ("interval:0", false),
        ("interval:3600001", false),
        ("interval:9999999", false),
        ("interval:", false),
        ("fast", false),
    ] {
        assert_eq!(durability.is_match(text), ok, "{text}");
        assert_eq!(text.parse::<walq_server::DurabilitySpec>().is_ok(), ok, "{text}");
    }
    let start = pattern("Start");
    for (text, ok) in [
        ("earliest", true),
        ("latest", true),
        ("offset:0", true),
        ("offset:9999999999999999999", true),
        ("timestamp:1700000000000", true),
        ("offset:", false),
        ("offset:-1", false),
        ("first", false),
    ] {
        assert_eq!(start.is_match(text), ok, "{text}");
        assert_eq!(text.parse::<walq_server::StartSpec>().is_ok(), ok, "{text}");
    }
}

/// Found by schemathesis (positive data rejected): what the document lets a
/// client leave out or send as null, the server takes. A batch without
/// `records` was documented as valid and answered 400; `durability: null`
/// and `queue_mode: null` in a queue's options were documented as valid and
/// answered 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_document_allows_the_server_takes() -> TestResult {
    let doc = walq_server::openapi();
    let schemas = &doc["components"]["schemas"];
    let required = schemas["BatchRequest"]["required"].as_array().cloned().unwrap_or_default();
    assert!(required.contains(&Value::from("records")), "a batch's records are required: {required:?}");
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let (status, v) = s.post_json("/v1/queues/b/batch", serde_json::json!({})).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    // Every option the schema lets be null, the server takes as null.
    for (schema, path) in [("QueueOptions", "/v1/queues/q"), ("GroupOptions", "/v1/queues/q/groups/g")] {
        for (name, property) in schemas[schema]["properties"].as_object().unwrap() {
            let nullable = property["type"].as_array().is_some_and(|t| t.contains(&Value::from("null")))
                || property["oneOf"]
                    .as_array()
                    .is_some_and(|o| o.contains(&serde_json::json!({"type": "null"})));
            let (status, v) = s.put_json(path, serde_json::json!({ name.clone(): null })).await;
            if nullable {
                assert!(
                    status == 200 || status == 201,
                    "{schema}.{name}: null is documented, got {status} {v}"
                );
            } else {
                assert_eq!(
                    (status, code(&v)),
                    (400, "bad_request"),
                    "{schema}.{name}: null is not documented"
                );
            }
        }
    }
    s.stop().await;
    Ok(())
}
