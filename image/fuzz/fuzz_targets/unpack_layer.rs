//! Fuzzes `unpack_layer` with structured tars (hostile names, links, whiteouts) and
//! raw bytes: it must never panic, and never change anything outside `dest`.
//!
//! Run (root, for mknod/xattrs): `cd image/fuzz && cargo +nightly fuzz run unpack_layer`
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vessel_image::unpack::{unpack_layer, Compression};

/// Components the fuzzer combines into paths and link targets.
const WORDS: &[&str] = &[
    "a",
    "b",
    "..",
    ".",
    "",
    "/",
    "evil",
    ".wh.a",
    ".wh..wh..opq",
    ".wh.evil",
    "OUTSIDE",
];

#[derive(Arbitrary, Debug)]
struct Entry {
    path: Vec<u8>,
    link: Vec<u8>,
    kind: u8,
    mode: u16,
    data: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Structured(Vec<Entry>),
    Raw(Vec<u8>),
}

fn words(idx: &[u8], outside: &str) -> String {
    idx.iter()
        .take(6)
        .map(|i| match WORDS[*i as usize % WORDS.len()] {
            "OUTSIDE" => outside,
            w => w,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn build(entries: &[Entry], outside: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries.iter().take(32) {
        let path = words(&e.path, outside);
        if path.is_empty() || path.len() >= 100 {
            continue;
        }
        let kinds = [b'0', b'1', b'2', b'3', b'4', b'5', b'6', b'x'];
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_gnu_mut().unwrap().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(tar::EntryType::new(kinds[e.kind as usize % kinds.len()]));
        let data: &[u8] = if e.kind % 8 == 0 { &e.data } else { b"" };
        h.set_size(data.len() as u64);
        h.set_mode(u32::from(e.mode) & 0o7777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let _ = h.set_link_name_literal(words(&e.link, outside));
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fuzz_target!(|input: Input| {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(outside.join("precious"), b"x").unwrap();
    let tar = match &input {
        Input::Structured(entries) => build(entries, outside.to_str().unwrap()),
        Input::Raw(bytes) => bytes.clone(),
    };
    let _ = unpack_layer(&tar[..], Compression::None, &dest);
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["precious"], "unpack wrote outside dest");
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"x");
});
