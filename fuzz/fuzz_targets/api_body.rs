//! Every JSON request body of the API into its validated form, as the
//! handlers do it: deserialize (serde_json, the extractors' decoder), then
//! the same checks the handler makes before it touches the manager
//! (`into_core`, `validate`, refusing unsupported fields). The first byte
//! picks the body type; the rest is the body. Must never panic, and a
//! refusal must be a 4xx.
#![no_main]

use forkvm_api::ApiError;
use forkvm_api::exec_ws::ExecWsRequest;
use forkvm_api::files::CpRequest;
use forkvm_api::wire::{
    ExecParams, ImageCreateParams, ImageImportParams, InstanceCreateParams, InstanceForkParams,
    InstanceStandbyParams, InstanceStartParams, SnapshotCreateParams, SnapshotForkParams,
    SnapshotRestoreParams, reject_compression,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// A refusal is the client's fault: 400-499, never a 5xx.
fn client_error<T>(r: Result<T, ApiError>) {
    if let Err(e) = r {
        let status = e.status;
        assert!(status.is_client_error(), "{status}: {e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => {
            if let Some(p) = body::<InstanceCreateParams>(bytes) {
                client_error(p.into_core());
            }
        }
        1 => {
            if let Some(p) = body::<InstanceStartParams>(bytes) {
                client_error(p.unsupported.refuse("start"));
            }
        }
        2 => {
            if let Some(p) = body::<InstanceStandbyParams>(bytes) {
                client_error(p.unsupported.refuse("standby"));
                client_error(reject_compression(p.compression.as_ref()));
            }
        }
        3 => {
            if let Some(p) = body::<InstanceForkParams>(bytes) {
                client_error(p.into_core());
            }
        }
        4 => {
            if let Some(p) = body::<SnapshotForkParams>(bytes) {
                client_error(p.into_core());
            }
        }
        5 => {
            if let Some(p) = body::<SnapshotCreateParams>(bytes) {
                client_error(p.validate());
            }
        }
        6 => {
            if let Some(p) = body::<SnapshotRestoreParams>(bytes) {
                client_error(p.validate());
            }
        }
        7 => {
            if let Some(p) = body::<ExecParams>(bytes) {
                client_error(p.into_core());
            }
        }
        8 => {
            if let Some(p) = body::<ImageCreateParams>(bytes) {
                client_error(p.into_core());
            }
        }
        9 => {
            if let Some(p) = body::<ImageImportParams>(bytes) {
                client_error(p.unsupported.refuse("image import"));
            }
        }
        10 => {
            let _ = body::<ExecWsRequest>(bytes);
        }
        _ => {
            let _ = body::<CpRequest>(bytes);
        }
    }
});
