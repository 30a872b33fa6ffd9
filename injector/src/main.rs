fn main() -> std::process::ExitCode {
    eprintln!("ferry-injector: not wired yet");
    std::process::ExitCode::from(2)
}
