//! `GET /instances/{id}/stats`: hypeman's InstanceStats, from the host.

use crate::error::ApiError;
use crate::routes::{ApiPath, AppState};
use crate::wire::ErrorBody;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Resource use of an instance's VM (hypeman's InstanceStats, plus packet
/// counts).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InstanceStats {
    pub instance_id: String,
    pub instance_name: String,
    pub allocated_vcpus: u32,
    /// Guest memory, bytes.
    pub allocated_memory_bytes: u64,
    /// CPU time of the VMM process (user + system), seconds.
    pub cpu_seconds: f64,
    /// Resident memory of the VMM process (guest RAM it touched, shared
    /// copy-on-write pages included, plus its own), bytes.
    pub memory_rss_bytes: u64,
    pub memory_vms_bytes: u64,
    /// RSS / allocated memory.
    pub memory_utilization_ratio: Option<f64>,
    /// Bytes and packets received by the guest (through its TAP).
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    /// forkvm: packet counts.
    pub network_rx_packets: u64,
    pub network_tx_packets: u64,
    /// forkvm: the guest's own MemTotal and MemAvailable (absent when its
    /// agent did not answer in time).
    pub guest_memory_total_bytes: Option<u64>,
    pub guest_memory_available_bytes: Option<u64>,
}

/// CPU, memory and network use of an instance's VM, as the host sees it.
#[utoipa::path(get, path = "/instances/{id}/stats", tag = "instances",
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = InstanceStats), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The instance has no VM")))]
pub(crate) async fn stats(
    State(m): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<InstanceStats>, ApiError> {
    let s = m.stats(&id).await?;
    let ratio = (s.allocated_memory_bytes > 0)
        .then(|| s.memory_rss_bytes as f64 / s.allocated_memory_bytes as f64);
    Ok(Json(InstanceStats {
        instance_id: s.instance_id,
        instance_name: s.instance_name,
        allocated_vcpus: s.allocated_vcpus,
        allocated_memory_bytes: s.allocated_memory_bytes,
        cpu_seconds: s.cpu_seconds,
        memory_rss_bytes: s.memory_rss_bytes,
        memory_vms_bytes: s.memory_vms_bytes,
        memory_utilization_ratio: ratio,
        network_rx_bytes: s.network_rx_bytes,
        network_tx_bytes: s.network_tx_bytes,
        network_rx_packets: s.network_rx_packets,
        network_tx_packets: s.network_tx_packets,
        guest_memory_total_bytes: s.guest_memory_total_bytes,
        guest_memory_available_bytes: s.guest_memory_available_bytes,
    }))
}
