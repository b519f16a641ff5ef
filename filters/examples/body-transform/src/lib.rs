//! Body transformer: buffers the whole request (or response) body, replaces every `find` with
//! `replace`, and passes the new body on. Content-Length is dropped in the headers phase since
//! the length changes; the proxy frames the new body itself.
//!
//! ```json
//! {"request": {"find": "cat", "replace": "dog"}, "response": {"find": "a", "replace": "b"}}
//! ```

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    find: String,
    replace: String,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Rules {
    request: Option<Rule>,
    response: Option<Rule>,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root { rules: Rc::new(Rules::default()) }));
}}

struct Root {
    rules: Rc<Rules>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice(&bytes) {
            Ok(r) => {
                self.rules = Rc::new(r);
                true
            }
            Err(e) => {
                log::error!("body-transform: bad plugin config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Transform { rules: self.rules.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Transform {
    rules: Rc<Rules>,
}

fn rewrite(body: &[u8], rule: &Rule) -> Vec<u8> {
    String::from_utf8_lossy(body)
        .replace(&rule.find, &rule.replace)
        .into_bytes()
}

impl Context for Transform {}

impl HttpContext for Transform {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.rules.request.is_some() {
            self.set_http_request_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        let Some(rule) = &self.rules.request else {
            return Action::Continue;
        };
        if !eos {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        self.set_http_request_body(0, size, &rewrite(&body, rule));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.rules.response.is_some() {
            self.set_http_response_header("content-length", None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        let Some(rule) = &self.rules.response else {
            return Action::Continue;
        };
        if !eos {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        self.set_http_response_body(0, size, &rewrite(&body, rule));
        Action::Continue
    }
}
