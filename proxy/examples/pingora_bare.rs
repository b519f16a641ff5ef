//! The least proxy pingora can be: every request to one upstream over a pooled HTTP/1.1
//! connection, no routing, no metrics, no logs. `weir-bench http` measures it beside weir so the
//! report can tell pingora's own cost per request from weir's.
//!
//! `pingora_bare LISTEN UPSTREAM [THREADS]`, e.g. `pingora_bare 127.0.0.1:8081 127.0.0.1:8080`.

use async_trait::async_trait;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;

// As in weir itself, so the comparison is of the request path alone.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare(std::net::SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_bare LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let upstream = upstream.parse().unwrap_or_else(|e| {
        eprintln!("pingora_bare: UPSTREAM {upstream:?}: {e}");
        std::process::exit(2);
    });
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Bare(upstream));
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
