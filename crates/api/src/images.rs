//! Image handlers: pull (`POST /images`, answered at once with the pending
//! image; the pull runs in the background), import, list, get, delete.
//! Image names contain slashes: `/images/{name}` takes the rest of the path
//! (raw or percent-encoded).

use crate::error::ApiError;
use crate::routes::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::wire::{ErrorBody, Image, ImageCreateParams, ImageImportParams, ImageListQuery};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

/// Pull and convert an OCI image. Answers at once (202) with the image as
/// recorded; poll `GET /images/{name}` until `ready` or `failed`. An image
/// already known and not failed is returned as it is (200).
#[utoipa::path(post, path = "/images", tag = "images", request_body = ImageCreateParams,
    responses((status = 202, body = Image), (status = 200, body = Image),
              (status = 400, body = ErrorBody)))]
pub(crate) async fn create_image(
    State(m): State<AppState>,
    ApiJson(p): ApiJson<ImageCreateParams>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    p.unsupported.refuse("image pull")?;
    let req = p.into_core()?;
    tracing::info!(image = %req.name, "pull requested");
    let rec = m.pull_image(req).await?;
    let status = if rec.status.in_progress() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(rec.into())))
}

/// Import an OCI layout or `docker save` archive from the daemon's host.
/// Answers once the image is ready or failed.
#[utoipa::path(post, path = "/images/import", tag = "images", request_body = ImageImportParams,
    responses((status = 201, body = Image), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn import_image(
    State(m): State<AppState>,
    ApiJson(p): ApiJson<ImageImportParams>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    p.unsupported.refuse("image import")?;
    let rec = m
        .import_image(
            std::path::Path::new(&p.path),
            p.name.as_deref(),
            p.tags.unwrap_or_default(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(rec.into())))
}

/// List images, oldest first.
#[utoipa::path(get, path = "/images", tag = "images", params(ImageListQuery),
    responses((status = 200, body = Vec<Image>), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_images(
    State(m): State<AppState>,
    ApiQuery(q): ApiQuery<ImageListQuery>,
) -> Result<Json<Vec<Image>>, ApiError> {
    let list = m.list_images(&q.tag_filter()?).await?;
    Ok(Json(list.into_iter().map(Image::from).collect()))
}

/// Get an image by name (normalized: `nginx` finds
/// `docker.io/library/nginx:latest`).
#[utoipa::path(get, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image reference")),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_image(
    State(m): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Image>, ApiError> {
    Ok(Json(m.get_image(&name).await?.into()))
}

/// Delete an image and its root disk; 409 while it is being pulled or an
/// instance or snapshot uses it.
#[utoipa::path(delete, path = "/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image reference")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn delete_image(
    State(m): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
