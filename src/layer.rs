//! The tower layer, which puts a [`RoomHandle`] into every request's extensions and nothing
//! more, and the builder's last step, which makes one.

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::bus::{Backend, redacted_target};
use crate::config::FanoutBuilder;
use crate::config::RedisTarget;
use crate::error::Error;
use crate::node::RoomHandle;
use crate::node::Shared;

/// Connects an axum `Router` to the Redis fan-out bus.
///
/// Every clone of the layer (and every [`RoomHandle`]) shares one node: one publisher
/// connection, one subscriber connection, one registry. Dropping the last of them stops the
/// node's background tasks.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use axum_fanout::FanoutLayer;
///
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hi" }))
///     .layer(FanoutLayer::new("redis://127.0.0.1:6379"));
/// ```
#[derive(Clone, Debug)]
pub struct FanoutLayer {
    shared: Arc<Shared>,
}

impl FanoutLayer {
    /// A layer with default settings for the Redis at `redis` (a URL, a
    /// `redis+sentinel://` URL naming the sentinels and the master, or with the `cluster`
    /// feature a Redis Cluster's node URLs: see [`RedisTarget`]).
    ///
    /// Never fails and never blocks: the node connects in the background and reports through
    /// [`RoomHandle::is_ready`]. An unparsable URL is logged and leaves the node never ready
    /// (every join and broadcast fails with [`Error::is_invalid_url`]); use
    /// [`builder`](FanoutLayer::builder)`(..).`[`build`](FanoutBuilder::build)`()` to get the
    /// error instead.
    ///
    /// ```no_run
    /// use axum::Router;
    /// use axum_fanout::FanoutLayer;
    ///
    /// let app: Router = Router::new().layer(FanoutLayer::new("redis://127.0.0.1:6379"));
    /// let under_sentinel: Router = Router::new().layer(FanoutLayer::new(
    ///     "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster",
    /// ));
    /// # #[cfg(feature = "cluster")]
    /// let on_a_cluster: Router = Router::new().layer(FanoutLayer::new([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ]));
    /// ```
    pub fn new(redis: impl Into<RedisTarget>) -> Self {
        FanoutBuilder::new(redis).build_lenient()
    }

    /// Starts a builder for non-default settings; [`build`](FanoutBuilder::build) fails with
    /// [`Error::is_invalid_url`] for an unparsable URL (under Sentinel: no sentinel address, no
    /// master name, a bad port; on a cluster: an empty list or an invalid node URL).
    pub fn builder(redis: impl Into<RedisTarget>) -> FanoutBuilder {
        FanoutBuilder::new(redis)
    }

    /// A handle to this node, for code that runs outside requests (jobs, health checks).
    pub fn handle(&self) -> RoomHandle {
        self.shared.start();
        RoomHandle::from_shared(self.shared.clone())
    }
}

impl<S> Layer<S> for FanoutLayer {
    type Service = FanoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.shared.start();
        FanoutService {
            inner,
            handle: RoomHandle::from_shared(self.shared.clone()),
        }
    }
}

/// The service produced by [`FanoutLayer`].
#[derive(Clone, Debug)]
pub struct FanoutService<S> {
    inner: S,
    handle: RoomHandle,
}

impl<S, B> Service<Request<B>> for FanoutService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.handle.start();
        let mut handle = self.handle.clone();
        let origins = &handle.shared.node.config.allowed_origins;
        handle.foreign_origin = !crate::origin::allowed(req.headers(), origins);
        req.extensions_mut().insert(handle);
        self.inner.call(req)
    }
}

impl FanoutBuilder {
    /// Builds the layer. Fails with [`Error::is_invalid_url`] when the Redis URL cannot be
    /// parsed, is `rediss://` without the `tls` feature, or asks for an unverified TLS
    /// connection (`#insecure`); an unreachable Redis, or a wrong password, is not an error
    /// here (the node connects in the background, and stays not ready until it succeeds).
    pub fn build(self) -> Result<FanoutLayer, Error> {
        let (connect, config) = self.into_parts();
        let backend = Backend::new(&connect)?;
        Ok(FanoutLayer {
            shared: Shared::new(config, Some(backend)),
        })
    }

    /// Builds the layer even when the URL is invalid: the node then never becomes ready and
    /// every join and broadcast fails with [`Error::is_invalid_url`]; the error is logged.
    pub(crate) fn build_lenient(self) -> FanoutLayer {
        let (connect, config) = self.into_parts();
        let backend = Backend::new(&connect)
            .inspect_err(|e| {
                tracing::error!(
                    url = %redacted_target(&connect),
                    // The error's message says why: the cause of an invalid url is part of it.
                    error = %e,
                    "axum-fanout: invalid redis url; this node will never be ready (use \
                     FanoutLayer::builder(..).build() to catch this at start-up)"
                );
            })
            .ok();
        FanoutLayer {
            shared: Shared::new(config, backend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_the_builder_nor_the_layer_shows_a_password() {
        let builder = FanoutLayer::builder("redis://alice:hunter2@127.0.0.1:1");
        let debug = format!("{builder:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("alice"),
            "{debug}"
        );
        let layer = builder.build().expect("valid url");
        assert!(!format!("{layer:?}").contains("hunter2"));
    }

    #[test]
    fn a_lenient_layer_with_a_bad_url_is_never_ready_and_says_why() {
        let layer = FanoutLayer::new("http//nope");
        assert!(!layer.handle().is_ready());
        let err = FanoutLayer::builder("http//nope")
            .build()
            .expect_err("invalid");
        assert!(err.is_invalid_url());
    }
}
