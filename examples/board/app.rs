//! The board's routes: the page, the client module, the protocol endpoint (read-only for
//! pages) and the HTTP push that feeds the boards.

use std::num::NonZeroUsize;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum_fanout::durable::Durability;
use axum_fanout::protocol::{Authorize, Denied, Grant, Protocol};
use axum_fanout::{FanoutLayer, Payload, RoomHandle, RoomName};

/// Every board is a durable room named `board-NAME` keeping its last 100 updates.
pub(crate) fn layer(redis: &str) -> Result<FanoutLayer, axum_fanout::Error> {
    let history = NonZeroUsize::new(100).unwrap_or(NonZeroUsize::MIN);
    FanoutLayer::builder(redis)
        .durable(Durability::default().history(history))
        .build()
}

pub(crate) fn app(layer: FanoutLayer) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/fanout.js", get(client))
        .route("/fanout", Protocol::new(Viewers).route())
        .route("/boards/{board}", post(push))
        .layer(layer)
}

/// Pages may read any board and publish to none: updates come from `POST /boards/NAME`.
struct Viewers;

impl Authorize for Viewers {
    async fn connect(&self, _request: &Parts) -> Result<Option<Grant>, Denied> {
        Ok(Some(Grant::new("viewer")))
    }

    async fn may_join(&self, _user: &str, room: &RoomName) -> Result<(), Denied> {
        if room.as_str().starts_with("board-") {
            Ok(())
        } else {
            Err(Denied::new("only boards can be read here"))
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn client() -> Response {
    let js = include_str!("../../clients/js/fanout.js");
    ([("content-type", "text/javascript; charset=utf-8")], js).into_response()
}

/// `POST /boards/NAME` with one JSON value: an update for every page of board NAME, with its
/// position in the board's history.
async fn push(Path(board): Path<String>, rooms: RoomHandle, body: String) -> Response {
    let Ok(payload) = Payload::raw_json(body) else {
        return (StatusCode::BAD_REQUEST, "the body must be one JSON value\n").into_response();
    };
    match rooms
        .broadcast(format!("board-{board}"), payload)
        .publish()
        .await
    {
        Ok(published) => {
            let seq = published.position().map_or(0, |p| p.seq());
            format!("{{\"seq\":{seq}}}\n").into_response()
        }
        Err(e) if e.is_invalid_room() => {
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}
