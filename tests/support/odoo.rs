//! A local Odoo, faithful to what the source relies on: `/jsonrpc` with
//! `common.authenticate` (a `false` result for bad credentials) and `object.execute_kw`
//! (`search_read`, `search_count`), Odoo 19's `/json/2/<model>/<method>` with a bearer API
//! key, domains in Polish notation (`|`, `&`, `!`, and `=, !=, >, >=, <, <=, in, not in`
//! leaves; a model with `active` hides archived records unless the domain names
//! `active`), `order`, `offset`, `limit`, `false` for empty fields, and the error envelope
//! (`error.data.name`, `error.data.message`). It can be told to fail N times with a 503.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

pub const DB: &str = "acme";
pub const LOGIN: &str = "api@acme.test";
pub const API_KEY: &str = "0ddf00ba5e";
const UID: i64 = 2;

#[derive(Default)]
pub struct Database {
    /// Model -> records (every field, as Odoo stores them).
    pub records: HashMap<String, Vec<Value>>,
    /// Answer the next N requests with a 503 from the proxy.
    pub fail_next: usize,
    /// Answer the next N requests with a 429 (the hosting's rate limit).
    pub throttle_next: usize,
    /// Hold the next N requests for `stall` before answering.
    pub stall_next: usize,
    pub stall: std::time::Duration,
    pub stalled: usize,
    pub throttled: usize,
    /// Every record returned by search_read, as (model, id, state).
    pub served: Vec<(String, i64, Option<String>)>,
    pub requests: usize,
}

pub struct FakeOdoo {
    pub url: String,
    pub db: Arc<Mutex<Database>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOdoo {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Shared = Arc<Mutex<Database>>;

const WITH_ACTIVE: [&str; 1] = ["res.partner"];

impl FakeOdoo {
    pub async fn start(db: Database) -> Self {
        let db = Arc::new(Mutex::new(db));
        let app = Router::new()
            .route("/jsonrpc", post(jsonrpc))
            .route("/json/2/{model}/{method}", post(json2))
            .with_state(db.clone());
        let (url, server) = super::serve(app).await;
        FakeOdoo { url, db, server }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Database) -> T) -> T {
        f(&mut self.db.lock().expect("db"))
    }
}

fn rpc_error(id: &Value, name: &str, message: &str) -> Response {
    Json(json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": 200,
            "message": "Odoo Server Error",
            "data": {
                "name": name,
                "debug": format!("Traceback (most recent call last):\n  ...\n{name}: {message}\n"),
                "message": message,
                "arguments": [message],
                "context": {},
            }
        }
    }))
    .into_response()
}

/// Holds a request when told to (a server that hangs past the client's timeout).
async fn maybe_stall(db: &Shared) {
    let stall = {
        let mut d = db.lock().expect("db");
        if d.stall_next > 0 {
            d.stall_next -= 1;
            d.stalled += 1;
            Some(d.stall)
        } else {
            None
        }
    };
    if let Some(s) = stall {
        tokio::time::sleep(s).await;
    }
}

fn unavailable(db: &Shared) -> Option<Response> {
    let mut d = db.lock().expect("db");
    d.requests += 1;
    if d.throttle_next > 0 {
        d.throttle_next -= 1;
        d.throttled += 1;
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body><h1>429 Too Many Requests</h1></body></html>",
            )
                .into_response(),
        );
    }
    if d.fail_next > 0 {
        d.fail_next -= 1;
        return Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
            )
                .into_response(),
        );
    }
    None
}

async fn jsonrpc(State(db): State<Shared>, Json(body): Json<Value>) -> Response {
    maybe_stall(&db).await;
    if let Some(r) = unavailable(&db) {
        return r;
    }
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let params = body.get("params").cloned().unwrap_or_default();
    let service = params.get("service").and_then(Value::as_str).unwrap_or("");
    let method = params.get("method").and_then(Value::as_str).unwrap_or("");
    let args = params
        .get("args")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let result = match (service, method) {
        ("common", "authenticate") => {
            let ok = args.first() == Some(&json!(DB))
                && args.get(1) == Some(&json!(LOGIN))
                && args.get(2) == Some(&json!(API_KEY));
            Ok(if ok { json!(UID) } else { json!(false) })
        }
        ("object", "execute_kw") => {
            if args.first() != Some(&json!(DB))
                || args.get(1) != Some(&json!(UID))
                || args.get(2) != Some(&json!(API_KEY))
            {
                return rpc_error(&id, "odoo.exceptions.AccessDenied", "Access Denied");
            }
            let model = args.get(3).and_then(Value::as_str).unwrap_or("");
            let method = args.get(4).and_then(Value::as_str).unwrap_or("");
            let positional = args
                .get(5)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut kwargs = args.get(6).cloned().unwrap_or_else(|| json!({}));
            if let (Some(domain), Some(o)) = (positional.first(), kwargs.as_object_mut()) {
                o.insert("domain".into(), domain.clone());
            }
            execute(&db, model, method, &kwargs)
        }
        _ => Err((
            "werkzeug.exceptions.NotFound".to_string(),
            format!("no method {service}.{method}"),
        )),
    };
    match result {
        Ok(v) => Json(json!({ "jsonrpc": "2.0", "id": id, "result": v })).into_response(),
        Err((name, message)) => rpc_error(&id, &name, &message),
    }
}

async fn json2(
    State(db): State<Shared>,
    Path((model, method)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    maybe_stall(&db).await;
    if let Some(r) = unavailable(&db) {
        return r;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("bearer ")
                .or_else(|| v.strip_prefix("Bearer "))
        });
    let database = headers.get("X-Odoo-Database").and_then(|v| v.to_str().ok());
    let error = |status: StatusCode, name: &str, message: &str| {
        (
            status,
            Json(json!({ "name": name, "message": message, "arguments": [message], "context": {},
                          "debug": format!("Traceback (most recent call last):\n{name}: {message}\n") })),
        )
            .into_response()
    };
    if bearer != Some(API_KEY) || database != Some(DB) {
        return error(
            StatusCode::UNAUTHORIZED,
            "werkzeug.exceptions.Unauthorized",
            "Invalid apikey",
        );
    }
    match execute(&db, &model, &method, &body) {
        Ok(v) => Json(v).into_response(),
        Err((name, message)) => {
            let status = if name.contains("AccessError") {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            error(status, &name, &message)
        }
    }
}

type Failure = (String, String);

fn execute(db: &Shared, model: &str, method: &str, kwargs: &Value) -> Result<Value, Failure> {
    let mut d = db.lock().expect("db");
    let Some(records) = d.records.get(model).cloned() else {
        return Err(("builtins.KeyError".into(), format!("'{model}'")));
    };
    let domain = kwargs
        .get("domain")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names_active = domain
        .iter()
        .any(|t| t.as_array().and_then(|a| a.first()).and_then(Value::as_str) == Some("active"));
    let mut rows: Vec<Value> = Vec::new();
    for r in records {
        if WITH_ACTIVE.contains(&model) && !names_active && r.get("active") == Some(&json!(false)) {
            continue;
        }
        if eval(&domain, &r).map_err(|e| ("ValueError".to_string(), e))? {
            rows.push(r);
        }
    }
    match method {
        "search_count" => Ok(json!(rows.len())),
        "search_read" => {
            if let Some(order) = kwargs.get("order").and_then(Value::as_str) {
                let keys: Vec<(String, bool)> = order
                    .split(',')
                    .map(|k| {
                        let mut p = k.split_whitespace();
                        let f = p.next().unwrap_or("id").to_string();
                        let desc = p.next().is_some_and(|d| d.eq_ignore_ascii_case("desc"));
                        (f, desc)
                    })
                    .collect();
                rows.sort_by(|a, b| {
                    for (f, desc) in &keys {
                        let o =
                            compare(&a[f.as_str()], &b[f.as_str()]).unwrap_or(CmpOrdering::Equal);
                        let o = if *desc { o.reverse() } else { o };
                        if o != CmpOrdering::Equal {
                            return o;
                        }
                    }
                    CmpOrdering::Equal
                });
            }
            let offset = kwargs.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize;
            let limit = kwargs
                .get("limit")
                .and_then(Value::as_u64)
                .map(|l| l as usize);
            let fields: Option<Vec<String>> =
                kwargs.get("fields").and_then(Value::as_array).map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                });
            let page: Vec<Value> = rows
                .into_iter()
                .skip(offset)
                .take(limit.unwrap_or(usize::MAX))
                .map(|r| match &fields {
                    None => r,
                    Some(fields) => {
                        let mut o = serde_json::Map::new();
                        o.insert("id".into(), r["id"].clone());
                        for f in fields {
                            o.insert(f.clone(), r.get(f).cloned().unwrap_or(json!(false)));
                        }
                        Value::Object(o)
                    }
                })
                .collect();
            for r in &page {
                let id = r["id"].as_i64().unwrap_or(0);
                let state = r.get("state").and_then(Value::as_str).map(str::to_string);
                d.served.push((model.to_string(), id, state));
            }
            Ok(Value::Array(page))
        }
        other => Err((
            "AttributeError".into(),
            format!("The method '{other}' does not exist on the model '{model}'"),
        )),
    }
}

/// Evaluates a domain (Polish notation; terms side by side are ANDed).
fn eval(domain: &[Value], r: &Value) -> Result<bool, String> {
    let mut i = 0;
    let mut all = true;
    while i < domain.len() {
        let (v, next) = term(domain, i, r)?;
        all &= v;
        i = next;
    }
    Ok(all)
}

fn term(domain: &[Value], i: usize, r: &Value) -> Result<(bool, usize), String> {
    match &domain[i] {
        Value::String(op) if op == "|" || op == "&" => {
            let (a, j) = term(domain, i + 1, r)?;
            let (b, k) = term(domain, j, r)?;
            Ok((if op == "|" { a || b } else { a && b }, k))
        }
        Value::String(op) if op == "!" => {
            let (a, j) = term(domain, i + 1, r)?;
            Ok((!a, j))
        }
        Value::Array(leaf) if leaf.len() == 3 => {
            let field = leaf[0].as_str().ok_or("a field name must be a string")?;
            let op = leaf[1].as_str().ok_or("an operator must be a string")?;
            let left = match r.get(field) {
                Some(Value::Array(m2o)) if m2o.len() == 2 => m2o[0].clone(),
                Some(v) => v.clone(),
                None => return Err(format!("Invalid field {field:?} in leaf {leaf:?}")),
            };
            let right = &leaf[2];
            let c = compare(&left, right);
            let v = match op {
                "=" => left == *right,
                "!=" => left != *right,
                ">" => c == Some(CmpOrdering::Greater),
                ">=" => matches!(c, Some(CmpOrdering::Greater | CmpOrdering::Equal)),
                "<" => c == Some(CmpOrdering::Less),
                "<=" => matches!(c, Some(CmpOrdering::Less | CmpOrdering::Equal)),
                "in" | "not in" => {
                    let list = right.as_array().ok_or("in needs a list")?;
                    (op == "in") == list.contains(&left)
                }
                other => return Err(format!("Invalid operator {other:?}")),
            };
            Ok((v, i + 1))
        }
        other => Err(format!("Invalid leaf {other}")),
    }
}

fn compare(a: &Value, b: &Value) -> Option<CmpOrdering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        // `false` (empty) sorts after values, as NULL does in PostgreSQL's ascending order.
        (Value::Bool(false), _) => Some(CmpOrdering::Greater),
        (_, Value::Bool(false)) => Some(CmpOrdering::Less),
        _ => None,
    }
}
