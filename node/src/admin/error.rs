//! Admin API errors: every failure becomes an [`ErrorBody`] with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use warren_consensus::cluster::ClusterError;
use warren_consensus::registry::RegistryError;
use warren_proto::api::{ApiError, ErrorBody, ErrorCode};
use warren_proto::registry::Kind;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiErr(pub ApiError);

impl ApiErr {
    /// A new error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ApiError {
            code,
            message: message.into(),
            field: None,
        })
    }

    /// The same error, naming the offending field.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.0.field = Some(field.into());
        self
    }

    /// The offending field, if one was named.
    pub fn field_name(&self) -> Option<&str> {
        self.0.field.as_deref()
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }

    /// 404 for an entity.
    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {name:?} not found"))
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(ErrorBody { error: self.0 })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<RegistryError> for ApiErr {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::Invalid { field, .. } => {
                Self::new(ErrorCode::InvalidField, message).field(field)
            }
            RegistryError::UnknownReference { field, .. } => {
                Self::new(ErrorCode::UnknownReference, message).field(field)
            }
            RegistryError::AlreadyExists { field, .. } => {
                Self::new(ErrorCode::AlreadyExists, message).field(field)
            }
            RegistryError::NotFound { .. } => Self::new(ErrorCode::NotFound, message),
            RegistryError::InUse { .. } => Self::new(ErrorCode::InUse, message),
            RegistryError::RevisionConflict { .. } => {
                Self::new(ErrorCode::RevisionConflict, message).field("revision")
            }
            RegistryError::Unauthorized => Self::new(ErrorCode::Unauthorized, message),
            RegistryError::Forbidden => Self::new(ErrorCode::Forbidden, message),
            RegistryError::Conflict { .. } => Self::new(ErrorCode::Conflict, message),
            RegistryError::PoolExhausted { .. } => Self::new(ErrorCode::Conflict, message),
            // Only the cluster itself sends the commands that return these.
            RegistryError::EmailBelongsToAnotherUser { .. }
            | RegistryError::UserDisabled { .. }
            | RegistryError::TooManyAttempts { .. }
            | RegistryError::SessionNotLive { .. }
            | RegistryError::NotInvited { .. } => Self::new(ErrorCode::Conflict, message),
            RegistryError::DeviceKeyTaken => {
                Self::new(ErrorCode::AlreadyExists, message).field("public_key")
            }
        }
    }
}

impl From<ClusterError> for ApiErr {
    fn from(e: ClusterError) -> Self {
        let message = e.to_string();
        match e {
            ClusterError::NoLeader(_) | ClusterError::Timeout { .. } => {
                Self::new(ErrorCode::NoQuorum, message)
            }
            ClusterError::Membership(_) => Self::new(ErrorCode::Conflict, message),
            // A member's build is too old for the write: the operator upgrades it first.
            ClusterError::Unsupported(_) => Self::new(ErrorCode::Conflict, message),
            ClusterError::ShuttingDown | ClusterError::Stopped(_) => {
                Self::new(ErrorCode::Unavailable, message)
            }
        }
    }
}
