//! The harness the sidecar's HTTP tests share: a server started in-process on
//! ephemeral ports over a directory, and a real HTTP client to talk to it.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use walq_server::{Config, Outcome, ServeError, Server, ServerHandle};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub struct Running {
    pub base: String,
    pub admin: String,
    pub handle: ServerHandle,
    pub task: tokio::task::JoinHandle<Result<Outcome, ServeError>>,
    pub http: reqwest::Client,
}

pub async fn start(dir: &Path) -> Running {
    start_with(dir, |_| {}).await
}

pub async fn start_with(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_grace_ms: 10_000,
        ..Config::default()
    };
    tweak(&mut config);
    let server = Server::bind(config).await.expect("bind");
    let base = format!("http://{}", server.local_addr());
    let admin = format!("http://{}", server.admin_addr());
    let handle = server.handle();
    let task = tokio::spawn(server.run());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server not ready in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { base, admin, handle, task, http }
}

impl Running {
    pub async fn stop(self) -> Outcome {
        self.handle.shutdown();
        self.task.await.expect("server task").expect("clean shutdown")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request, returns the status and the JSON body (Null if empty).
    pub async fn call(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("body");
        let v =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON body") };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(self.http.get(self.url(path))).await
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(self.http.post(self.url(path)).body(body.to_string())).await
    }

    pub async fn put_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(self.http.put(self.url(path)).body(body.to_string())).await
    }

    pub async fn produce(&self, queue: &str, value: &str) -> u64 {
        let (status, v) = self
            .call(self.http.post(self.url(&format!("/v1/queues/{queue}/records"))).body(value.to_string()))
            .await;
        assert_eq!(status, 200, "{v}");
        v["offset"].as_u64().unwrap()
    }
}

/// The `error.code` of an error answer.
pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("(no error code)")
}
