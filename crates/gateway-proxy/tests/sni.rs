//! The SNI parser against real rustls ClientHellos and hostile inputs.

mod common;

use common::client_hello;
use gateway_proxy::sni::{sniff, SniError, Sniff, MAX_SNIFF_BYTES};

fn tls(sni: &str) -> Sniff {
    Sniff::Tls {
        sni: Some(sni.to_string()),
    }
}

/// Split one handshake record into records of the given payload sizes (the last takes the
/// remainder).
fn reframe(hello: &[u8], sizes: &[usize]) -> Vec<u8> {
    assert_eq!(hello[0], 0x16);
    let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    let payload = &hello[5..5 + len];
    let mut out = Vec::new();
    let mut rest = payload;
    for (i, &size) in sizes.iter().enumerate() {
        let take = if i + 1 == sizes.len() {
            rest.len()
        } else {
            size.min(rest.len())
        };
        let (chunk, tail) = rest.split_at(take);
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
        rest = tail;
    }
    out
}

/// Append a padding extension of `pad` bytes to a real ClientHello and re-frame it into
/// records of at most 16 KiB.
fn inflate(hello: &[u8], pad: usize) -> Vec<u8> {
    let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    let mut msg = hello[5..5 + len].to_vec();
    // Locate the extensions block.
    let mut p = 4 + 2 + 32;
    p += 1 + msg[p] as usize;
    p += 2 + u16::from_be_bytes([msg[p], msg[p + 1]]) as usize;
    p += 1 + msg[p] as usize;
    let ext_len = u16::from_be_bytes([msg[p], msg[p + 1]]) as usize;
    let new_ext_len = ext_len + 4 + pad;
    assert!(new_ext_len <= 0xffff);
    msg[p..p + 2].copy_from_slice(&(new_ext_len as u16).to_be_bytes());
    msg.extend_from_slice(&[0x00, 0x15]);
    msg.extend_from_slice(&(pad as u16).to_be_bytes());
    msg.extend(std::iter::repeat_n(0u8, pad));
    let body_len = msg.len() - 4;
    msg[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    let mut out = Vec::new();
    for chunk in msg.chunks(16 * 1024) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn real_hello_with_gateway_sni() {
    let hello = client_hello("daskgateway-abc", true);
    assert_eq!(sniff(&hello).unwrap(), tls("daskgateway-abc"));
    // Bytes after the ClientHello (e.g. early data) do not matter.
    let mut more = hello.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert_eq!(sniff(&more).unwrap(), tls("daskgateway-abc"));
}

#[test]
fn real_hello_dotted_cluster_name() {
    let hello = client_hello("daskgateway-ns.0123456789abcdef", true);
    assert_eq!(
        sniff(&hello).unwrap(),
        tls("daskgateway-ns.0123456789abcdef")
    );
}

#[test]
fn real_hello_without_sni() {
    let hello = client_hello("daskgateway-abc", false);
    assert_eq!(sniff(&hello).unwrap(), Sniff::Tls { sni: None });
    // Addressed by IP: rustls sends no SNI.
    let hello = client_hello("127.0.0.1", true);
    assert_eq!(sniff(&hello).unwrap(), Sniff::Tls { sni: None });
}

#[test]
fn hello_split_into_two_records() {
    let hello = client_hello("daskgateway-abc", true);
    let len = hello.len() - 5;
    for split in [1, 2, 3, 4, 5, 40, len / 2, len - 1] {
        let framed = reframe(&hello, &[split, 0]);
        assert_eq!(
            sniff(&framed).unwrap(),
            tls("daskgateway-abc"),
            "split at {split}"
        );
        for n in 0..framed.len() {
            assert_eq!(
                sniff(&framed[..n]).unwrap(),
                Sniff::Incomplete,
                "split {split} prefix {n}"
            );
        }
    }
}

#[test]
fn hello_in_many_records() {
    let hello = client_hello("daskgateway-abc", true);
    let framed = reframe(&hello, &[7; 100]);
    assert_eq!(sniff(&framed).unwrap(), tls("daskgateway-abc"));
}

#[test]
fn large_hello_across_16k_records() {
    let hello = client_hello("daskgateway-big", true);
    let big = inflate(&hello, 40_000);
    assert!(big.len() > 3 * 16 * 1024 / 2);
    assert_eq!(sniff(&big).unwrap(), tls("daskgateway-big"));
    for n in (0..big.len()).step_by(997) {
        assert_eq!(sniff(&big[..n]).unwrap(), Sniff::Incomplete, "prefix {n}");
    }
    // Over the cap.
    let huge = inflate(&hello, 65_300);
    assert_eq!(sniff(&huge), Err(SniError::TooLarge));
}

#[test]
fn every_truncation_is_incomplete() {
    for hello in [
        client_hello("daskgateway-abc", true),
        client_hello("daskgateway-abc", false),
    ] {
        for n in 0..hello.len() {
            assert_eq!(sniff(&hello[..n]).unwrap(), Sniff::Incomplete, "prefix {n}");
        }
    }
}

#[test]
fn non_tls_inputs() {
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
        Sniff::NotTls
    );
    assert_eq!(sniff(b"G").unwrap(), Sniff::NotTls);
    assert_eq!(
        sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap(),
        Sniff::NotTls
    );
    assert_eq!(sniff(&[0x00, 0x01, 0x02]).unwrap(), Sniff::NotTls);
    // SSLv2-style or random first byte 0x16 with a wrong major version.
    assert_eq!(sniff(&[0x16, 0x01, 0x00]).unwrap(), Sniff::NotTls);
    assert_eq!(sniff(&[]).unwrap(), Sniff::Incomplete);
}

#[test]
fn malformed_lengths() {
    let hello = client_hello("daskgateway-abc", true);

    // Record length over the 16 KiB limit.
    let mut bad = hello.clone();
    bad[3..5].copy_from_slice(&0x4001u16.to_be_bytes());
    assert_eq!(sniff(&bad), Err(SniError::RecordTooLarge(0x4001)));

    // Handshake length shorter than the real body: the inner vectors overrun it.
    let mut bad = hello.clone();
    let body_len = u32::from_be_bytes([0, bad[6], bad[7], bad[8]]) - 20;
    bad[6..9].copy_from_slice(&body_len.to_be_bytes()[1..]);
    assert!(
        matches!(sniff(&bad), Err(SniError::Malformed(_))),
        "{:?}",
        sniff(&bad)
    );

    // Session id length over 32.
    let mut bad = hello.clone();
    bad[5 + 4 + 2 + 32] = 33;
    assert!(matches!(sniff(&bad), Err(SniError::Malformed(_))));

    // Extensions length off by one.
    let mut bad = hello.clone();
    let mut p = 5 + 4 + 2 + 32;
    p += 1 + bad[p] as usize;
    p += 2 + u16::from_be_bytes([bad[p], bad[p + 1]]) as usize;
    p += 1 + bad[p] as usize;
    let ext_len = u16::from_be_bytes([bad[p], bad[p + 1]]) + 1;
    bad[p..p + 2].copy_from_slice(&ext_len.to_be_bytes());
    assert!(matches!(sniff(&bad), Err(SniError::Malformed(_))));

    // Not a ClientHello (ServerHello type).
    let mut bad = hello.clone();
    bad[5] = 2;
    assert_eq!(sniff(&bad), Err(SniError::NotClientHello(2)));

    // Empty record.
    assert_eq!(sniff(&[0x16, 3, 1, 0, 0, 1]), Err(SniError::EmptyRecord));
}

/// xorshift64*: a tiny deterministic PRNG for the fuzz loop.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn fuzz_no_panic_and_prefix_consistency() {
    let seeds = [
        client_hello("daskgateway-abc", true),
        client_hello("daskgateway-abc", false),
        reframe(&client_hello("daskgateway-xyz", true), &[50, 0]),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for iter in 0..20_000 {
        let input: Vec<u8> = match iter % 4 {
            // Pure noise, often starting like a handshake record.
            0 => {
                let n = rng.below(600);
                let mut v: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                if rng.below(2) == 0 && v.len() >= 3 {
                    v[0] = 0x16;
                    v[1] = 0x03;
                }
                v
            }
            // Mutated real hello.
            1 | 2 => {
                let mut v = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                if rng.below(3) == 0 {
                    let cut = rng.below(v.len());
                    v.truncate(cut);
                }
                v
            }
            // Real hello with random re-framing and truncation.
            _ => {
                let seed = &seeds[rng.below(2)];
                let sizes: Vec<usize> = (0..1 + rng.below(5)).map(|_| rng.below(300)).collect();
                let mut v = reframe(seed, &sizes);
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
                v
            }
        };
        let result = sniff(&input);
        if let Ok(Sniff::Tls { .. }) = result {
            // A verdict on the full input means every prefix was still undecided.
            if iter % 16 == 1 {
                for n in 0..input.len() {
                    let r = sniff(&input[..n]);
                    assert!(
                        matches!(r, Ok(Sniff::Incomplete)),
                        "prefix {n} of a complete hello gave {r:?}"
                    );
                }
            }
        }
    }
    // The cap: a buffer of MAX_SNIFF_BYTES never yields Incomplete.
    let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    big.resize(MAX_SNIFF_BYTES, 0x01);
    assert!(!matches!(sniff(&big), Ok(Sniff::Incomplete)));
}
