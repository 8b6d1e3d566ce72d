//! Slow and stalled clients against the real binary (1-second timeouts): a client that never
//! finishes its headers is disconnected, one whose body stops arriving gets a 408 in OpenAI's
//! error shape, one that stops reading a large response has its connection closed — and the daemon
//! keeps serving everyone else throughout.

use qlorad_tests::daemon::Daemon;
use qlorad_tests::smollm2;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Reads until EOF, an error or `limit`; returns the bytes and whether the peer closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut out, mut buf, t) = (Vec::new(), [0u8; 65536], Instant::now());
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (out, true), // reset
        }
    }
    (out, false)
}

#[test]
fn slow_clients_time_out_and_the_daemon_keeps_serving() {
    let Some(model) = smollm2() else { return };
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        env!("CARGO_BIN_EXE_qlorad"),
        &model,
        &[
            "--state-dir",
            state.path().to_str().unwrap(),
            "--header-read-timeout-s",
            "1",
            "--body-read-timeout-s",
            "1",
            "--write-timeout-s",
            "1",
        ],
    );
    let addr = format!("127.0.0.1:{}", d.port);

    // Slowloris: half a request head, then silence → the server hangs up.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        closed,
        "a client that never finished its headers kept its connection"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A body that stops arriving → 408 with an OpenAI error.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{\"model\": \"smollm2\",",
    )
    .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"code\":\"request_timeout\""), "{resp}");
    // The rest of that body was never read: the connection is not reusable, and says so.
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );

    // A client that stops reading a large response: the server closes the connection instead of
    // holding it (and the response) forever.
    let big = vec![b'x'; 48 << 20];
    let (status, f) = d.upload("big.bin", &big, "batch");
    assert_eq!(status, 200, "{f}");
    let id = f["id"].as_str().unwrap();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(format!("GET /v1/files/{id}/content HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_secs(4)); // read nothing: the server's writes stall
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(30));
    assert!(closed, "the stalled connection was not closed");
    assert!(
        got.len() < big.len(),
        "the whole {} bytes arrived; the write never stalled",
        got.len()
    );

    // Everyone else is still served.
    assert_eq!(d.get("/health").0, 200);
    let (s, c) = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"model": "smollm2", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(s, 200, "{c}");
}
