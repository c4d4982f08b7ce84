//! A mocked Kubernetes API server for unit tests (a `tower_test` service under a real
//! `kube::Client`): requests arrive in order and each test answers them itself, so it sees
//! exactly which requests the code under test makes. Shared by the controller's tests
//! (`controller/tests.rs`) and the gateway side's (`backend_tests.rs`).

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client talking to namespace `dask` of a mocked API server, and that server.
pub(crate) fn pair() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "dask"), ApiServer(handle))
}

/// The mocked API server: requests arrive in order; each gets an answer from the test.
pub(crate) struct ApiServer(pub(crate) Handle);

/// One request the code under test made.
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: String,
    /// The `Content-Type` header (which kind of patch a PATCH is).
    pub(crate) content_type: String,
    pub(crate) body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    pub(crate) fn ok(self, body: Value) {
        self.respond.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    /// Answers with the request's own body (creations and updates accepted as sent).
    pub(crate) fn echo(self) {
        let body = self.body.clone();
        self.ok(body)
    }

    pub(crate) fn text(self, text: &str) {
        self.respond.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(text.as_bytes().to_vec()))
                .unwrap(),
        );
    }

    /// A failure `Status` with HTTP status `code`; `reason` is also its message.
    pub(crate) fn status(self, code: u16, reason: &str) {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": reason, "reason": reason, "code": code});
        self.respond.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
}

impl ApiServer {
    pub(crate) async fn next(&mut self) -> Call {
        let (req, respond) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("no further request was made")
            .expect("the client was dropped");
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Call {
            method,
            path,
            query,
            content_type,
            body,
            respond,
        }
    }

    /// Asserts that no request arrives for a while.
    pub(crate) async fn silent(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await;
        if let Ok(Some((req, _))) = r {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}
