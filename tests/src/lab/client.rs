//! The command line's client for the lab's API server (HTTP over its Unix socket).

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

use super::{Lab, LabError};

pub struct ApiClient {
    socket: PathBuf,
    lab: String,
}

/// A response: status code and JSON body.
pub struct Reply {
    pub code: u16,
    pub body: Value,
}

impl Reply {
    /// The `Status` message (for errors), or the body as text.
    pub fn message(&self) -> String {
        self.body["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| self.body.to_string())
    }
    pub fn reason(&self) -> String {
        self.body["reason"].as_str().unwrap_or("Unknown").to_owned()
    }
}

impl ApiClient {
    pub fn new(lab: &Lab) -> ApiClient {
        ApiClient {
            socket: lab.socket(),
            lab: lab.name.clone(),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, LabError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                LabError::State(format!(
                    "the lab {:?} is not running (no API server at {}: {e}); start it with `ferry-lab up`",
                    self.lab,
                    self.socket.display()
                ))
            })?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| LabError::Api(format!("API server handshake: {e}")))?;
        tokio::spawn(conn);
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "lab-apiserver")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| LabError::Api(e.to_string()))?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| LabError::Api(format!("{method} {path}: {e}")))?;
        let code = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| LabError::Api(format!("{method} {path}: {e}")))?
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { code, body })
    }

    /// GET that must succeed.
    pub async fn get(&self, path: &str) -> Result<Value, LabError> {
        let r = self.request("GET", path, None).await?;
        if r.code == 200 {
            Ok(r.body)
        } else {
            Err(LabError::Api(format!(
                "Error from server ({}): {}",
                r.reason(),
                r.message()
            )))
        }
    }

    /// One object, or `None` if it does not exist.
    pub async fn get_opt(&self, path: &str) -> Result<Option<Value>, LabError> {
        let r = self.request("GET", path, None).await?;
        match r.code {
            200 => Ok(Some(r.body)),
            404 => Ok(None),
            _ => Err(LabError::Api(format!(
                "Error from server ({}): {}",
                r.reason(),
                r.message()
            ))),
        }
    }
}
