//! `ferry-netcheck connect ADDR TOKEN`: connect (2 s timeout), send TOKEN and a newline, print the
//! line the server answers. Exit 0 on an answer, 1 otherwise (the error on stderr). The namespace
//! tests run it with `nsenter --net=... -S UID -G GID` to act as an application or as the proxy.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// `ferry-netcheck http ADDR PATH HOST`: one HTTP/1.1 GET, prints `STATUS BODY`.
fn http(addr: SocketAddr, path: &str, host: &str, headers: &[String]) -> std::io::Result<String> {
    use std::io::Read;
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(format!("{status} {body}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("http") {
        let (Some(addr), Some(path), Some(host)) = (
            args.get(2).and_then(|a| a.parse().ok()),
            args.get(3),
            args.get(4),
        ) else {
            eprintln!("usage: ferry-netcheck http ADDR PATH HOST ['Name: value']...");
            return ExitCode::from(2);
        };
        return match http(addr, path, host, &args[5..]) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some("connect"), Some(addr), Some(token)) =
        (args.get(1).map(String::as_str), args.get(2), args.get(3))
    else {
        eprintln!("usage: ferry-netcheck connect ADDR TOKEN");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("not a socket address: {addr}");
        return ExitCode::from(2);
    };
    let run = || -> std::io::Result<String> {
        let timeout = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(format!("{token}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    };
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
