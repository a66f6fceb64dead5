//! sg-probe: tiny servers and clients for the demo and tests, run inside namespaces with
//! `ip netns exec`. No dependencies beyond std, so its behaviour is easy to trust.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sg-probe", about = "Tiny servers and clients for sg demos and tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP on each --http port and accept-and-close on each --tcp port, until killed.
    Serve {
        #[arg(long)]
        http: Vec<u16>,
        #[arg(long)]
        tcp: Vec<u16>,
        /// Text of the HTTP response body.
        #[arg(long, default_value = "hello")]
        name: String,
    },
    /// HTTP GET http://ADDR:PORT/ ; exit 0 with the status line, 1 on timeout or error.
    Get {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// TCP connect to ADDR:PORT ; exit 0 if it connects, 1 otherwise.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Serve { http, tcp, name } => {
            let mut threads = Vec::new();
            for (port, is_http) in http
                .iter()
                .map(|p| (*p, true))
                .chain(tcp.iter().map(|p| (*p, false)))
            {
                let l = match TcpListener::bind(("0.0.0.0", port)) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("sg-probe: bind port {port}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let name = name.clone();
                threads.push(std::thread::spawn(move || {
                    for mut s in l.incoming().flatten() {
                        if is_http {
                            // Read the whole request head before answering: closing with
                            // unread data would reset the connection.
                            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                            let mut req = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => req.extend_from_slice(&buf[..n]),
                                }
                            }
                            let body = format!("{name}: port {port}\n");
                            let resp = format!(
                                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = s.write_all(resp.as_bytes());
                        }
                    }
                }));
            }
            for t in threads {
                let _ = t.join();
            }
            ExitCode::SUCCESS
        }
        Cmd::Get { addr, timeout_ms } => {
            let t = Duration::from_millis(timeout_ms);
            let start = Instant::now();
            let r = (|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, t)?;
                s.set_read_timeout(Some(t))?;
                s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
                let mut resp = String::new();
                s.read_to_string(&mut resp)?;
                Ok(resp)
            })();
            match r {
                Ok(resp) => {
                    let status = resp.lines().next().unwrap_or("").to_string();
                    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
                    println!("{status} ({} ms): {body}", start.elapsed().as_millis());
                    ExitCode::SUCCESS
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    println!("timed out after {} ms", start.elapsed().as_millis());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    println!("failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Connect { addr, timeout_ms } => {
            let start = Instant::now();
            match TcpStream::connect_timeout(&addr, Duration::from_millis(timeout_ms)) {
                Ok(_) => {
                    println!("connected ({} ms)", start.elapsed().as_millis());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("no connection after {} ms: {e}", start.elapsed().as_millis());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
