//! The HBONE server (HTTP/2 CONNECT termination) driven by raw bytes after the HTTP/2 preface,
//! as a peer that finished mTLS could send them: never a panic, and every connection ends in
//! bounded (virtual) time however the peer behaves — its timeouts and limits hold.
#![no_main]
use common::hbone::server::serve_connection;
use common::hbone::H2Settings;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(client);
        // The peer: preface, then the fuzzer's frames; it then stays silent with the
        // connection open (the server must still end it).
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(PREFACE).await;
            let _ = wr.write_all(&input).await;
            std::future::pending::<()>().await;
            drop(wr);
        });
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let (_drain, watch) = common::drain::Drain::new();
        let served = serve_connection(server, H2Settings::default(), watch, |req| async move {
            // Exercise the forwarded/authority accessors and a tunnel that echoes.
            let _ = req.forwarded_for();
            if req.authority.port() % 2 == 0 {
                if let Ok(stream) = req.accept() {
                    let (mut r, mut w) = tokio::io::split(common::hbone::io::TunnelIo::new(stream));
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        tokio::io::copy(&mut r, &mut w),
                    )
                    .await;
                }
            } else {
                req.reject(http::StatusCode::FORBIDDEN);
            }
        });
        let ended = tokio::time::timeout(Duration::from_secs(24 * 3600), served).await;
        assert!(ended.is_ok(), "the connection outlived a day of silence");
        writer.abort();
        reader.abort();
    });
});
