//! External authorization: holds each request, asks an HTTP service (a cluster named in the
//! plugin config) with `dispatch_http_call`, and lets the request through on 200 or answers
//! 403 with the service's body otherwise.
//!
//! ```json
//! {"cluster": "authz", "path": "/check", "timeout_ms": 1000}
//! ```

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    cluster: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
}

fn default_path() -> String {
    "/check".into()
}

fn default_timeout() -> u64 {
    1000
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root { settings: None }));
}}

struct Root {
    settings: Option<Rc<Settings>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice(&bytes) {
            Ok(s) => {
                self.settings = Some(Rc::new(s));
                true
            }
            Err(e) => {
                log::error!("authz: bad plugin config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Authz {
            settings: self.settings.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Authz {
    settings: Rc<Settings>,
}

impl HttpContext for Authz {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let user = self.get_http_request_header("x-user").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let s = &self.settings;
        let call = self.dispatch_http_call(
            &s.cluster,
            vec![
                (":method", "GET"),
                (":path", &s.path),
                (":authority", &s.cluster),
                ("x-user", &user),
                ("x-original-path", &path),
            ],
            None,
            vec![],
            Duration::from_millis(s.timeout_ms),
        );
        match call {
            Ok(_) => Action::Pause,
            Err(status) => {
                log::warn!("authz: dispatch failed: {status:?}");
                self.send_http_response(503, vec![("x-authz", "unavailable")], Some(b"authz unavailable\n"));
                Action::Pause
            }
        }
    }
}

impl Context for Authz {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        if status == "200" {
            let who = self
                .get_http_call_response_header("x-authz-subject")
                .unwrap_or_else(|| "anonymous".into());
            self.set_http_request_header("x-authz-subject", Some(&who));
            self.resume_http_request();
        } else {
            let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
            self.send_http_response(403, vec![("x-authz", "denied")], Some(&body));
        }
    }
}
