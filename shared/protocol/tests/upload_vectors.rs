//! The upload encoding, pinned byte for byte by the test vectors in `tests/vectors/`: what this
//! build encodes from the listed fields must be exactly the file, and the file must decode to
//! exactly the fields. A change to the layout fails here before it reaches a client.

use std::path::PathBuf;

use millrace_protocol::upload::{
    decode_report_list, decode_upload, encode_report_list, SealedShare, UploadReport,
    REPORT_LIST_MEDIA_TYPE, REPORT_MEDIA_TYPE,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    reports: Vec<VectorReport>,
}

#[derive(Deserialize)]
struct VectorReport {
    report_id: String,
    time: i64,
    public_share: String,
    shares: Vec<VectorShare>,
}

#[derive(Deserialize)]
struct VectorShare {
    hpke_key_id: u8,
    encapped_key: String,
    ciphertext: String,
}

fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name)
}

fn hex_file(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(vector_path(name)).unwrap();
    let digits: String = text.split_whitespace().collect();
    hex::decode(digits).unwrap()
}

fn reports() -> Vec<UploadReport> {
    let text = std::fs::read_to_string(vector_path("upload-report-v1.json")).unwrap();
    let v: Vectors = serde_json::from_str(&text).unwrap();
    v.reports
        .into_iter()
        .map(|r| {
            let share = |s: &VectorShare| SealedShare {
                hpke_key_id: s.hpke_key_id,
                encapped_key: hex::decode(&s.encapped_key).unwrap().try_into().unwrap(),
                ciphertext: hex::decode(&s.ciphertext).unwrap(),
            };
            UploadReport {
                report_id: hex::decode(&r.report_id).unwrap().try_into().unwrap(),
                time: r.time,
                public_share: hex::decode(&r.public_share).unwrap(),
                shares: [share(&r.shares[0]), share(&r.shares[1])],
            }
        })
        .collect()
}

#[test]
fn one_report_encodes_to_the_vector_byte_for_byte_and_decodes_back() {
    let expected = hex_file("upload-report-v1.hex");
    let report = &reports()[0];
    assert_eq!(
        hex::encode(report.encode().unwrap()),
        hex::encode(&expected)
    );
    assert_eq!(&UploadReport::decode(&expected).unwrap(), report);
    assert_eq!(
        decode_upload(REPORT_MEDIA_TYPE, &expected).unwrap(),
        std::slice::from_ref(report)
    );
}

#[test]
fn a_report_list_encodes_to_the_vector_byte_for_byte_and_decodes_back() {
    let expected = hex_file("upload-report-list-v1.hex");
    let reports = reports();
    assert_eq!(
        hex::encode(encode_report_list(&reports).unwrap()),
        hex::encode(&expected)
    );
    assert_eq!(decode_report_list(&expected).unwrap(), reports);
    assert_eq!(
        decode_upload(REPORT_LIST_MEDIA_TYPE, &expected).unwrap(),
        reports
    );
}
