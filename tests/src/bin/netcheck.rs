//! `ferry-netcheck connect ADDR TOKEN`: connect (2 s timeout), send TOKEN and a newline, print the
//! line the server answers. Exit 0 on an answer, 1 otherwise (the error on stderr). The namespace
//! tests run it with `nsenter --net=... -S UID -G GID` to act as an application or as the proxy.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
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
