//! Header rewrite: sets and removes request and response headers, and sets trailer fields of
//! requests and responses that end with trailers, as its plugin config says.
//!
//! ```json
//! {"request_set": {"x-a": "1"}, "request_remove": ["x-b"],
//!  "response_set": {"x-c": "2"}, "response_remove": ["server"],
//!  "request_trailers_set": {"x-d": "3"}, "response_trailers_set": {"x-e": "4"}}
//! ```

use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Rules {
    request_set: BTreeMap<String, String>,
    request_remove: Vec<String>,
    response_set: BTreeMap<String, String>,
    response_remove: Vec<String>,
    request_trailers_set: BTreeMap<String, String>,
    response_trailers_set: BTreeMap<String, String>,
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
        let Some(bytes) = self.get_plugin_configuration() else {
            return true;
        };
        match serde_json::from_slice(&bytes) {
            Ok(rules) => {
                self.rules = Rc::new(rules);
                true
            }
            Err(e) => {
                log::error!("header-rewrite: bad plugin config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Rewrite { rules: self.rules.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Rewrite {
    rules: Rc<Rules>,
}

impl Context for Rewrite {}

impl HttpContext for Rewrite {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for name in &self.rules.request_remove {
            self.set_http_request_header(name, None);
        }
        for (name, value) in &self.rules.request_set {
            self.set_http_request_header(name, Some(value));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for name in &self.rules.response_remove {
            self.set_http_response_header(name, None);
        }
        for (name, value) in &self.rules.response_set {
            self.set_http_response_header(name, Some(value));
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        for (name, value) in &self.rules.request_trailers_set {
            self.set_http_request_trailer(name, Some(value));
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        for (name, value) in &self.rules.response_trailers_set {
            self.set_http_response_trailer(name, Some(value));
        }
        Action::Continue
    }
}
