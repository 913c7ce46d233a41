//! The fanout protocol: a ready WebSocket endpoint, one socket for many rooms, and what the
//! application decides about it ([`Authorize`]).
//!
//! The toolkit ([`FanoutSocket`](crate::FanoutSocket)) leaves the wire format to the
//! application; this module is one, documented in `PROTOCOL.md` at the repository's root and
//! spoken by the JavaScript client in `clients/js`. One route behind the [`FanoutLayer`]
//! serves it: clients join and leave rooms (plain, durable with resume, or as presence
//! members), publish with idempotency keys, read history and presence, and refresh their
//! credentials, each command answered once by id; the node pushes the rooms' messages, the
//! resume and loss notices and the presence changes. Everything goes through the toolkit's own
//! machinery: the same delivery path, order, resume and loss guarantees as the README states.
//!
//! ```no_run
//! use axum::Router;
//! use axum_fanout::FanoutLayer;
//! use axum_fanout::protocol::{Permissive, Protocol};
//!
//! # async fn run() -> std::io::Result<()> {
//! let app: Router = Router::new()
//!     .route("/fanout", Protocol::new(Permissive).route())
//!     .layer(FanoutLayer::new("redis://127.0.0.1:6379"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! ## The upgrade
//! A request from a browser on another origin is answered 403
//! ([`FanoutBuilder::allowed_origins`](crate::FanoutBuilder::allowed_origins)); one that does
//! not offer the subprotocol [`SUBPROTOCOL`] is answered 400, naming it; credentials the
//! application refuses ([`Authorize::connect`]) 401. Then the socket is attached like any
//! other, under the node's limits.
//!
//! ## Closing
//! Only non-JSON or binary frames (1007, 1003), frames over the size limit (1009), the rate
//! limit (1008), credentials not sent in time (1008,
//! [`Protocol::connect_timeout`]) and expired credentials (4001) close a socket; every other
//! mistake is an error reply. [`close`](crate::close) lists the codes.
//!
//! ## Reserved for users
//! Messages to a user (`fanout.direct`) and disconnecting a user are reserved in the protocol
//! and not sent by this version.
//!
//! [`FanoutLayer`]: crate::FanoutLayer

mod auth;
mod reads;
mod redis;
mod session;
mod wire;

pub use auth::{Authorize, Denied, Grant, Permissive};

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::extract::Request;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use crate::handle::MissingFanoutLayer;
use crate::node::RoomHandle;

/// The WebSocket subprotocol of this version of the protocol, which a client must offer.
pub const SUBPROTOCOL: &str = "fanout.v1";

/// The protocol's endpoint: [`route`](Protocol::route) mounts it.
#[derive(Debug)]
pub struct Protocol<A> {
    settings: Settings<A>,
}

/// What every session of one endpoint shares.
#[derive(Debug)]
pub(crate) struct Settings<A> {
    auth: A,
    /// How long an idempotent publish key is remembered, fleet-wide.
    dedupe_window: Duration,
    /// How long a socket without credentials has to send `connect`.
    connect_timeout: Duration,
}

impl<A: Authorize> Protocol<A> {
    /// The endpoint, with `auth` deciding who connects and what they may do.
    pub fn new(auth: A) -> Self {
        Self {
            settings: Settings {
                auth,
                dedupe_window: Duration::from_secs(300),
                connect_timeout: Duration::from_secs(10),
            },
        }
    }

    /// How long the fleet remembers a publish's key (`PROTOCOL.md`, "Idempotent publish"): a
    /// retry with the same key within it is answered as a duplicate and sent nowhere. Each
    /// key costs one small Redis key for that long.
    ///
    /// Defaults to 5 minutes (at least 1 second).
    pub fn dedupe_window(mut self, window: Duration) -> Self {
        self.settings.dedupe_window = window.max(Duration::from_secs(1));
        self
    }

    /// How long a socket whose upgrade carried no credentials ([`Authorize::connect`]
    /// answered `Ok(None)`) has to succeed a `connect` command. After it the node closes the
    /// socket with 1008 `"credentials not sent in time"`
    /// ([`close::NO_CREDENTIALS_REASON`](crate::close::NO_CREDENTIALS_REASON)), after a
    /// `fanout.disconnect` frame: a socket that never authenticates must not hold a
    /// connection slot for ever. A refused `connect` does not extend it.
    ///
    /// Defaults to 10 seconds (at least 1 millisecond).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The route's handler, for `Router::route(path, ..)` behind the [`FanoutLayer`](crate::FanoutLayer).
    pub fn route<S>(self) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let settings = Arc::new(self.settings);
        axum::routing::get(move |request: Request| upgrade(settings.clone(), request))
    }
}

/// Whether the request offers [`SUBPROTOCOL`] among its `Sec-WebSocket-Protocol` values.
fn offers_subprotocol(request: &axum::http::request::Parts) -> bool {
    request
        .headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

async fn upgrade<A: Authorize>(settings: Arc<Settings<A>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let Some(rooms) = parts.extensions.get::<RoomHandle>().cloned() else {
        return MissingFanoutLayer.into_response();
    };
    if let Some(refused) = rooms.refuse_origin() {
        return refused;
    }
    if !offers_subprotocol(&parts) {
        let body = format!(
            "this endpoint speaks the fanout protocol: offer the websocket subprotocol \
             {SUBPROTOCOL} (Sec-WebSocket-Protocol); this node speaks {SUBPROTOCOL} only\n"
        );
        return (StatusCode::BAD_REQUEST, body).into_response();
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let grant = match settings.auth.connect(&parts).await {
        Ok(grant) => grant,
        Err(denied) => {
            return (StatusCode::UNAUTHORIZED, format!("{}\n", denied.reason())).into_response();
        }
    };
    let upgrade = upgrade.protocols([SUBPROTOCOL]);
    rooms.on_upgrade(upgrade, move |socket| session::run(socket, settings, grant))
}
