fn main() -> std::process::ExitCode {
    eprintln!("ferry-proxy: not implemented yet (see the project's issue tracker)");
    std::process::ExitCode::from(2)
}
