//! Every example of section 7 of the JSON-RPC 2.0 specification, sent over a real Unix socket.

mod common;

use common::{Client, normalize, spec_methods, start};
use my_hypervisor_frontend::rpc::Limits;
use serde_json::{Value, json};

/// (request line, expected reply or `None` when the server must not reply)
fn examples() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        (
            "positional parameters",
            r#"{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}"#,
            Some(json!({"jsonrpc": "2.0", "result": 19, "id": 1})),
        ),
        (
            "positional parameters, swapped",
            r#"{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}"#,
            Some(json!({"jsonrpc": "2.0", "result": -19, "id": 2})),
        ),
        (
            "named parameters",
            r#"{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}"#,
            Some(json!({"jsonrpc": "2.0", "result": 19, "id": 3})),
        ),
        (
            "named parameters, reordered",
            r#"{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}"#,
            Some(json!({"jsonrpc": "2.0", "result": 19, "id": 4})),
        ),
        ("notification update", r#"{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}"#, None),
        ("notification foobar", r#"{"jsonrpc": "2.0", "method": "foobar"}"#, None),
        (
            "non-existent method",
            r#"{"jsonrpc": "2.0", "method": "foobar", "id": "1"}"#,
            Some(json!({"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"})),
        ),
        (
            "invalid JSON",
            r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]"#,
            Some(json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null})),
        ),
        (
            "invalid Request object",
            r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#,
            Some(json!({"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null})),
        ),
        (
            "batch, invalid JSON",
            r#"[
  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
  {"jsonrpc": "2.0", "method"
]"#,
            Some(json!({"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null})),
        ),
        (
            "empty array",
            r#"[]"#,
            Some(json!({"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null})),
        ),
        (
            "invalid batch, not empty",
            r#"[1]"#,
            Some(json!([
                {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}
            ])),
        ),
        (
            "invalid batch",
            r#"[1,2,3]"#,
            Some(json!([
                {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},
                {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},
                {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}
            ])),
        ),
        (
            "mixed batch",
            r#"[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]"#,
            Some(json!([
                {"jsonrpc": "2.0", "result": 7, "id": "1"},
                {"jsonrpc": "2.0", "result": 19, "id": "2"},
                {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},
                {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
                {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"}
            ])),
        ),
        (
            "batch of notifications only",
            r#"[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]"#,
            None,
        ),
    ]
}

/// Sent after a request that must get no reply: the next line must answer this one.
const SENTINEL: &str = r#"{"jsonrpc":"2.0","method":"get_data","id":"sentinel"}"#;

/// The spec writes its examples over several lines; on this transport a request is one line.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specification_examples() {
    let server = start(spec_methods(), Limits::default());
    let mut c = Client::connect(&server).await;
    for (name, request, expected) in examples() {
        c.send(one_line(request).as_bytes()).await;
        match expected {
            Some(expected) => {
                let got = c.recv().await;
                assert_eq!(normalize(&got), normalize(&expected), "{name}: got {got}");
                if let Some(err) = got.get("error") {
                    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {got}");
                }
            }
            None => {
                c.send(SENTINEL.as_bytes()).await;
                let got = c.recv().await;
                assert_eq!(got["id"], "sentinel", "{name}: the server replied to a notification: {got}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_gets_its_own_replies() {
    let server = start(spec_methods(), Limits::default());
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.send(br#"{"jsonrpc":"2.0","method":"subtract","params":[10,1],"id":1}"#).await;
    b.send(br#"{"jsonrpc":"2.0","method":"subtract","params":[20,1],"id":1}"#).await;
    assert_eq!(b.recv().await["result"], 19);
    assert_eq!(a.recv().await["result"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_params_and_request_details() {
    let server = start(spec_methods(), Limits::default());
    let mut c = Client::connect(&server).await;
    let r = c.call(r#"{"jsonrpc":"2.0","method":"subtract","params":["a"],"id":1}"#).await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    // Wrong protocol version: an invalid request that keeps its id.
    let r = c.call(r#"{"jsonrpc":"1.0","method":"subtract","params":[1,2],"id":9}"#).await;
    assert_eq!(normalize(&r), json!({"jsonrpc":"2.0","error":{"code":-32600},"id":9}));
    // An id that is not a string or number is not a notification.
    let r = c.call(r#"{"jsonrpc":"2.0","method":"subtract","params":[1,2],"id":{}}"#).await;
    assert_eq!(normalize(&r), json!({"jsonrpc":"2.0","error":{"code":-32600},"id":null}));
    // Blank lines are skipped; CRLF line ends are accepted.
    c.send(b"").await;
    let r = c.call("{\"jsonrpc\":\"2.0\",\"method\":\"get_data\",\"id\":2}\r").await;
    assert_eq!(r["result"], json!(["hello", 5]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_share_the_connection() {
    let server = start(spec_methods(), Limits::default());
    let mut c = Client::connect(&server).await;
    let r = c.call(r#"{"jsonrpc":"2.0","method":"test_subscribe","params":[3, 4],"id":1}"#).await;
    let sub_id = r["result"].clone();
    assert!(sub_id.is_number() || sub_id.is_string(), "{r}");
    for seq in 0..3 {
        let n = c.recv().await;
        assert_eq!(n["method"], "test_notification", "{n}");
        assert_eq!(n["params"]["subscription"], sub_id, "{n}");
        assert_eq!(n["params"]["result"]["seq"], seq, "{n}");
    }
    // Requests still work on the same connection afterwards.
    let r = c.call(r#"{"jsonrpc":"2.0","method":"sum","params":[1,2],"id":2}"#).await;
    assert_eq!(r["result"], 3);
    // A long-running subscription can be cancelled.
    let r = c.call(r#"{"jsonrpc":"2.0","method":"test_subscribe","params":[1000000000, 4],"id":3}"#).await;
    let sub_id = r["result"].clone();
    let unsub = json!({"jsonrpc":"2.0","method":"test_unsubscribe","params":[sub_id],"id":4}).to_string();
    c.send(unsub.as_bytes()).await;
    loop {
        let m = c.recv().await;
        if m.get("id") == Some(&json!(4)) {
            assert_eq!(m["result"], true, "{m}");
            break;
        }
        assert_eq!(m["method"], "test_notification", "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_limited() {
    let limits = Limits { max_subscriptions: 1, ..Limits::default() };
    let server = start(spec_methods(), limits);
    let mut c = Client::connect(&server).await;
    let r = c.call(r#"{"jsonrpc":"2.0","method":"test_subscribe","params":[1000000000, 4],"id":1}"#).await;
    assert!(r.get("result").is_some(), "{r}");
    c.send(br#"{"jsonrpc":"2.0","method":"test_subscribe","params":[1, 4],"id":2}"#).await;
    loop {
        let m = c.recv().await;
        if m.get("id") == Some(&json!(2)) {
            assert_eq!(m["error"]["code"], -32006, "{m}");
            break;
        }
    }
}
