//! The local health check of a VIP: can this node serve it right now?
//! A failing check makes the holder release the VIP at once (DESIGN.md §3.7).

use std::path::Path;
use std::time::Duration;

use steward_proto::vip::VipCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Runs `check` once; `Err` says why it failed, for the log.
pub async fn run_check(
    check: &VipCheck,
    haproxy_socket: &Path,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        match check {
            VipCheck::None => Ok(()),
            VipCheck::Haproxy => haproxy_answers(haproxy_socket).await,
            VipCheck::Tcp(hostport) => TcpStream::connect(hostport.as_str())
                .await
                .map(drop)
                .map_err(|e| format!("tcp {hostport}: {e}")),
            VipCheck::Http(url) => http_ok(url).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("{check}: no answer within {timeout:?}"))?
}

/// HAProxy's admin socket answers `show info` with its name.
async fn haproxy_answers(socket: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("haproxy socket {}: {e}", socket.display());
    let mut stream = UnixStream::connect(socket).await.map_err(fail)?;
    stream.write_all(b"show info\n").await.map_err(fail)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(fail)?;
    if String::from_utf8_lossy(&answer).contains("Name: HAProxy") {
        Ok(())
    } else {
        Err(format!(
            "haproxy socket {}: unexpected answer to `show info`",
            socket.display()
        ))
    }
}

/// `GET url` over HTTP/1.0 answers 2xx or 3xx.
async fn http_ok(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fail = |e: std::io::Error| format!("{url}: {e}");
    let mut stream = TcpStream::connect(hostport).await.map_err(fail)?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: steward-agent\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.map_err(fail)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn tcp_and_http_checks_pass_and_fail() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().await.unwrap();
                // The whole request is read before the answer and the
                // close: a close with unread bytes is a reset, which the
                // client may see before the answer.
                let mut request = Vec::new();
                let mut buf = [0u8; 512];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        let http = VipCheck::Http(format!("http://{addr}/healthz"));
        assert_eq!(run_check(&http, Path::new("/x"), t).await, Ok(()));
        assert!(run_check(&http, Path::new("/x"), t)
            .await
            .unwrap_err()
            .contains("HTTP 503"));
        assert_eq!(
            run_check(&VipCheck::Tcp(addr.to_string()), Path::new("/x"), t).await,
            Ok(())
        );
        server.await.unwrap();
        // Nobody listens there any more.
        assert!(
            run_check(&VipCheck::Tcp(addr.to_string()), Path::new("/x"), t)
                .await
                .is_err()
        );
        assert!(
            run_check(&VipCheck::Haproxy, Path::new("/nonexistent.sock"), t)
                .await
                .unwrap_err()
                .contains("/nonexistent.sock")
        );
        assert_eq!(run_check(&VipCheck::None, Path::new("/x"), t).await, Ok(()));
    }
}
