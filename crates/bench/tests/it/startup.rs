use std::net::TcpListener;
use std::time::Duration;

use shoal_bench::startup;

#[test]
fn measures_bare_hello_from_exec_to_ready_and_stops_it() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let command = vec![env!("CARGO_BIN_EXE_bare-hello").to_owned(), "--addr".to_owned(), addr.clone()];
    let result =
        startup::measure(&command, addr.parse().unwrap(), "/", Duration::from_millis(1), Duration::from_secs(20))
            .unwrap();
    assert!(result.ready_ms > 0.0);
    assert!(result.listening_log_ms.is_some(), "bare-hello prints a listening line");
    assert!(result.rss_at_ready_kib.is_some_and(|kib| kib > 0));
    assert_eq!(result.exit_code, Some(0), "SIGTERM is a clean exit");
}

#[test]
fn a_command_that_exits_is_reported() {
    let command = vec!["true".to_owned()];
    let error = startup::measure(
        &command,
        "127.0.0.1:1".parse().unwrap(),
        "/",
        Duration::from_millis(5),
        Duration::from_secs(10),
    )
    .unwrap_err();
    assert!(matches!(error, startup::StartupError::Exited(_)), "{error}");
}
