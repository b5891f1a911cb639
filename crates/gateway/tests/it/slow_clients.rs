//! Slow and hostile clients over real sockets: a trickled head, a trickled
//! body, an idle keep-alive connection, too many connections, too many
//! sleeping `GET /?delay_ms=` requests. Every wait is bounded.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::helpers::{TestGateway, expect_problem, spawn_gateway, spawn_worker};

/// Longest any step of these tests waits.
const BOUND: Duration = Duration::from_secs(10);

async fn connect(gateway: &TestGateway) -> TcpStream {
    let addr = gateway.url.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("connect")
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(BOUND, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection within {BOUND:?}");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_head_trickled_byte_by_byte_is_cut_off() {
    let gateway = spawn_gateway(&[], &[], &["--header-read-timeout", "300ms"]).await;
    let mut stream = connect(&gateway).await;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let trickle = async {
        // At most 100 bytes, one every 50 ms: far longer than the timeout.
        for _ in 0..100 {
            if stream.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let cut = tokio::time::timeout(BOUND, trickle).await.unwrap_or(false);
    let rest = read_to_close(&mut stream).await;
    assert!(cut || !rest.contains("200 OK"), "the trickled head was served: {rest}");
}

#[tokio::test]
async fn a_slow_body_gets_408_and_holds_no_in_flight_place() {
    let worker = spawn_worker(&[]).await;
    let gateway = spawn_gateway(&[worker.addr], &[], &["--body-read-timeout", "500ms", "--max-in-flight", "1"]).await;
    let mut slow = connect(&gateway).await;
    slow.write_all(
        b"POST /v1/tasks/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[1,",
    )
    .await
    .unwrap();
    // While that body is pending, the single in-flight place is free.
    assert_eq!(gateway.task("echo", json!({"n": 1})).await.status(), 200);
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("urn:shoal:problem:body-timeout"), "{answer}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let gateway = spawn_gateway(&[], &[], &["--idle-timeout", "300ms", "--header-read-timeout", "30s"]).await;
    let mut stream = connect(&gateway).await;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn connections_over_the_cap_get_a_503_and_are_closed() {
    let gateway = spawn_gateway(&[], &[], &["--max-connections", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&gateway).await;
        // A full request, so the connection is accepted and served.
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buffer = [0u8; 512];
        let n = tokio::time::timeout(BOUND, stream.read(&mut buffer)).await.expect("answer").unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    let mut third = connect(&gateway).await;
    let answer = read_to_close(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("too-many-connections"), "{answer}");
    drop(held);
    // Places come back when connections close (bounded retry).
    let served = crate::helpers::eventually(BOUND, || async {
        let response = reqwest::Client::new().get(format!("{}/", gateway.url)).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert!(served.is_some());
}

#[tokio::test]
async fn sleeping_hellos_are_capped_apart_from_other_requests() {
    let gateway = spawn_gateway(&[], &[], &["--max-delayed", "1"]).await;
    let sleeper = gateway.http.get(format!("{}/?delay_ms=3000", gateway.url)).send();
    let others = async {
        let shed = crate::helpers::eventually(BOUND, || async {
            let response = gateway.http.get(format!("{}/?delay_ms=1", gateway.url)).send().await.ok()?;
            (response.status() == 503).then_some(response)
        })
        .await
        .expect("a second sleeping request is shed");
        expect_problem(shed, 503).await;
        assert_eq!(gateway.http.get(format!("{}/", gateway.url)).send().await.unwrap().status(), 200);
    };
    let (sleeper, ()) = tokio::join!(sleeper, others);
    assert_eq!(sleeper.unwrap().status(), 200);
}
