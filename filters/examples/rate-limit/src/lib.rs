//! Local rate limiter: a request budget shared by every worker of the proxy through shared data,
//! updated with compare-and-swap so concurrent workers never over-admit. Requests over the
//! budget get 429. The budget refills every `window_s` seconds (0: never).
//!
//! ```json
//! {"requests": 10, "window_s": 60, "key_header": "x-client"}
//! ```

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    requests: u64,
    #[serde(default)]
    window_s: u64,
    #[serde(default)]
    key_header: Option<String>,
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
                log::error!("rate-limit: bad plugin config: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Limit {
            settings: self.settings.clone()?,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Limit {
    settings: Rc<Settings>,
}

impl Limit {
    /// Takes one request from the budget of `key`; false when it is spent.
    fn take(&self, key: &str) -> bool {
        loop {
            let (value, cas) = self.get_shared_data(key);
            let used = value
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_le_bytes);
            if used >= self.settings.requests {
                return false;
            }
            match self.set_shared_data(key, Some(&(used + 1).to_le_bytes()), cas) {
                Ok(()) => return true,
                Err(Status::CasMismatch) => continue,
                Err(status) => {
                    log::warn!("rate-limit: shared data write failed: {status:?}");
                    return true;
                }
            }
        }
    }
}

impl Context for Limit {}

impl HttpContext for Limit {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let window = match self.settings.window_s {
            0 => 0,
            w => {
                let now = self.get_current_time().duration_since(UNIX_EPOCH).unwrap_or_default();
                now.as_secs() / w
            }
        };
        let client = match &self.settings.key_header {
            Some(h) => self.get_http_request_header(h).unwrap_or_default(),
            None => String::new(),
        };
        let key = format!("rate-limit/{client}/{window}");
        if self.take(&key) {
            Action::Continue
        } else {
            self.send_http_response(
                429,
                vec![("x-rate-limited", "true")],
                Some(b"rate limited\n"),
            );
            Action::Pause
        }
    }
}
