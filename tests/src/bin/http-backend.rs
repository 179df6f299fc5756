//! A tiny HTTP backend for the VIP tests: answers every request with
//! `200 OK` and the body `NAME\n`, closing the connection. One thread per
//! connection; runs until killed.
//!
//!     http-backend --listen IP:PORT --name NAME

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::exit;
use std::time::Duration;

const USAGE: &str = "usage: http-backend --listen IP:PORT --name NAME";

fn usage_error(msg: &str) -> ! {
    eprintln!("http-backend: {msg}\n{USAGE}");
    exit(2);
}

fn parse_args() -> (SocketAddr, String) {
    let mut listen = None;
    let mut name = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage_error("--listen needs a value"));
                let addr = v
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|_| usage_error(&format!("--listen {v:?}: not IP:PORT")));
                listen = Some(addr);
            }
            "--name" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage_error("--name needs a value"));
                if v.is_empty() || v.contains(['\r', '\n']) {
                    usage_error("--name must be one non-empty line");
                }
                name = Some(v);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    match (listen, name) {
        (Some(l), Some(n)) => (l, n),
        _ => usage_error("--listen and --name are required"),
    }
}

fn serve(mut stream: TcpStream, response: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    // Read the request head (up to the blank line), then answer.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if stream.write_all(response).is_err() {
        return;
    }
    let _ = stream.flush();
    // Half-close and drain briefly, so the answer is not cut by a reset.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn main() {
    let (listen, name) = parse_args();
    let body = format!("{name}\n");
    let response: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .leak();
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("http-backend: cannot listen on {listen}: {e}");
        exit(1);
    });
    println!("http-backend {name} listening on {listen}");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || serve(stream, response));
            }
            Err(e) => {
                eprintln!("http-backend: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
