//! The `redis+sentinel://` URL: the sentinels' addresses, the master's name, and who logs in
//! where; its form with the passwords hidden, for logs.

use crate::error::Error;

/// A sentinel's port when the URL names none (Sentinel's own default).
pub(super) const DEFAULT_PORT: u16 = 26379;

/// What a `redis+sentinel://` URL says, before any client is built.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::bus) struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the sentinels and to the master.
    pub(super) tls: bool,
    /// The master's user name and password as written (percent-encoded), without the `@`.
    pub(super) userinfo: Option<String>,
    pub(super) sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under (`sentinel monitor NAME ...`).
    pub(super) master: String,
    pub(super) db: Option<i64>,
    pub(super) sentinel_username: Option<String>,
    pub(super) sentinel_password: Option<String>,
}

/// Whether `url` is a Sentinel URL (`redis+sentinel://` or `rediss+sentinel://`).
pub(in crate::bus) fn is_sentinel_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("redis+sentinel")
            || scheme.eq_ignore_ascii_case("rediss+sentinel")
    })
}

fn invalid(why: &str) -> Error {
    Error::invalid_url(format!(
        "{why} (expected redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER, e.g. \
         redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster)"
    ))
}

impl SentinelUrl {
    /// Parses `redis[s]+sentinel://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]
    /// [?sentinel_username=U&sentinel_password=P]`. Error messages never repeat a part of the
    /// URL that might hold a password.
    pub(super) fn parse(url: &str) -> Result<Self, Error> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("not a url"));
        };
        if !is_sentinel_url(url) {
            return Err(invalid("not a redis+sentinel:// url"));
        }
        let tls = scheme.eq_ignore_ascii_case("rediss+sentinel");
        if rest.contains('#') {
            return Err(invalid(
                "a sentinel url takes no #fragment (#insecure is not supported; percent-encode \
                 `#` in a password as %23)",
            ));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
            None => (None, authority),
        };
        let sentinels = hosts
            .split(',')
            .enumerate()
            .map(|(i, entry)| host_port(entry.trim(), i))
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.len() == 1 && sentinels[0].0.is_empty() {
            return Err(invalid("no sentinel address"));
        }
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut segments = path.strip_prefix('/').unwrap_or(path).split('/');
        let master = segments.next().unwrap_or("").to_owned();
        if master.is_empty() {
            return Err(invalid(
                "no master name after the sentinel addresses (the NAME of `sentinel monitor NAME`)",
            ));
        }
        let db = match segments.next() {
            None | Some("") => None,
            Some(db) => Some(db.parse::<i64>().map_err(|_| {
                invalid("the database after the master name must be a number (/MASTER/DB)")
            })?),
        };
        if segments.next().is_some() {
            return Err(invalid(
                "too many path segments: only /MASTER or /MASTER/DB",
            ));
        }
        let (mut sentinel_username, mut sentinel_password) = (None, None);
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "sentinel_username" => sentinel_username = Some(value.into_owned()),
                "sentinel_password" => sentinel_password = Some(value.into_owned()),
                _ => {
                    return Err(invalid(
                        "unknown query parameter: a sentinel url takes only sentinel_username \
                         and sentinel_password",
                    ));
                }
            }
        }
        Ok(Self {
            tls,
            userinfo,
            sentinels,
            master,
            db,
            sentinel_username,
            sentinel_password,
        })
    }

    /// The URL again with every password replaced by `***`, for logs and `Debug`.
    pub(super) fn redacted(&self) -> String {
        let scheme = if self.tls {
            "rediss+sentinel"
        } else {
            "redis+sentinel"
        };
        let user = match self.userinfo.as_deref().map(|u| u.split_once(':')) {
            None => String::new(),
            Some(None) => format!("{}@", self.userinfo.as_deref().unwrap_or("")),
            Some(Some((user, _))) => format!("{user}:***@"),
        };
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(host, port)| match host.contains(':') {
                true => format!("[{host}]:{port}"),
                false => format!("{host}:{port}"),
            })
            .collect();
        let db = self.db.map(|db| format!("/{db}")).unwrap_or_default();
        let mut query = Vec::new();
        if let Some(user) = &self.sentinel_username {
            query.push(format!("sentinel_username={user}"));
        }
        if self.sentinel_password.is_some() {
            query.push("sentinel_password=***".to_owned());
        }
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        format!(
            "{scheme}://{user}{}/{}{db}{query}",
            hosts.join(","),
            self.master
        )
    }
}

/// Said with every malformed address: a password's unencoded `/` ends the address list early.
const ENCODE: &str = "; percent-encode `/ ? # @` in a password";

/// One sentinel address, `HOST`, `HOST:PORT` or `[IPv6]:PORT`; `i` numbers it in errors.
fn host_port(entry: &str, i: usize) -> Result<(String, u16), Error> {
    let nth = i + 1;
    let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
        let Some((host, rest)) = v6.split_once(']') else {
            return Err(invalid(&format!(
                "sentinel address {nth}: unclosed [ of an IPv6 address{ENCODE}"
            )));
        };
        (host, rest.strip_prefix(':'))
    } else {
        match entry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() {
        if i == 0 && port.is_none() {
            return Ok((String::new(), 0)); // an empty list: the caller says so
        }
        return Err(invalid(&format!(
            "sentinel address {nth} has no host{ENCODE}"
        )));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(&format!(
                    "sentinel address {nth} has no valid port (HOST:PORT, 1 to 65535){ENCODE}"
                ))
            })?,
    };
    Ok((host.to_owned(), port))
}

/// `url` with its passwords hidden, or only its scheme when it does not parse.
pub(in crate::bus) fn redacted(url: &str) -> String {
    match SentinelUrl::parse(url) {
        Ok(parsed) => parsed.redacted(),
        Err(_) => {
            let scheme = url.split_once("://").map_or("", |(s, _)| s);
            format!("{scheme}://(unparsable; hidden)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> SentinelUrl {
        SentinelUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e:?}"))
    }

    fn error(url: &str) -> String {
        let err = SentinelUrl::parse(url).expect_err(url);
        assert!(err.is_invalid_url());
        std::error::Error::source(&err).expect("cause").to_string()
    }

    #[test]
    fn sentinel_urls_are_parsed() {
        let url = parse(
            "redis+sentinel://alice:p%40ss@10.0.0.1:26380, 10.0.0.2,[::1]:5000/mymaster/2\
             ?sentinel_username=sam&sentinel_password=s%26cret",
        );
        assert_eq!(
            url,
            SentinelUrl {
                tls: false,
                userinfo: Some("alice:p%40ss".to_owned()),
                sentinels: vec![
                    ("10.0.0.1".to_owned(), 26380),
                    ("10.0.0.2".to_owned(), 26379),
                    ("::1".to_owned(), 5000),
                ],
                master: "mymaster".to_owned(),
                db: Some(2),
                sentinel_username: Some("sam".to_owned()),
                sentinel_password: Some("s&cret".to_owned()),
            }
        );
        let plain = parse("REDISS+SENTINEL://h:1/m");
        assert!(plain.tls);
        assert_eq!(plain.userinfo, None);
        assert_eq!(plain.db, None);
        assert!(is_sentinel_url("Redis+Sentinel://h/m"));
        assert!(!is_sentinel_url("redis://h:1"));
    }

    #[test]
    fn bad_sentinel_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("redis+sentinel:///m", "no sentinel address"),
            ("redis+sentinel://:pw@/m", "no sentinel address"),
            ("redis+sentinel://h:1", "no master name"),
            ("redis+sentinel://h:1/", "no master name"),
            (
                "redis+sentinel://h:1,,h:2/m",
                "sentinel address 2 has no host",
            ),
            (
                "redis+sentinel://h:x/m",
                "sentinel address 1 has no valid port",
            ),
            (
                "redis+sentinel://h:1,h:70000/m",
                "sentinel address 2 has no valid port",
            ),
            ("redis+sentinel://h:0/m", "no valid port"),
            ("redis+sentinel://[::1/m", "unclosed ["),
            ("redis+sentinel://h/m/zero", "must be a number"),
            ("redis+sentinel://h/m/0/x", "too many path segments"),
            ("redis+sentinel://h/m?password=x", "unknown query parameter"),
            ("redis+sentinel://h/m#insecure", "no #fragment"),
            (
                "redis+sentinel://:se/cret@h/m",
                "has no host; percent-encode",
            ),
        ] {
            let cause = error(url);
            assert!(cause.contains(says), "{url}: {cause}");
            assert!(
                cause.contains("redis+sentinel://10.0.0.1:26379"),
                "{url}: {cause}"
            );
            assert!(!cause.contains("cret"), "{url}: {cause}");
        }
    }

    #[test]
    fn passwords_are_hidden_from_the_shown_url() {
        for (url, shown) in [
            (
                "redis+sentinel://h1:1,h2:2/m",
                "redis+sentinel://h1:1,h2:2/m",
            ),
            (
                "rediss+sentinel://alice:pw@h:1/m/3?sentinel_username=sam&sentinel_password=spw",
                "rediss+sentinel://alice:***@h:1/m/3?sentinel_username=sam&sentinel_password=***",
            ),
            (
                "redis+sentinel://:p@w@h/m",
                "redis+sentinel://:***@h:26379/m",
            ),
            (
                "redis+sentinel://alice@h/m",
                "redis+sentinel://alice@h:26379/m",
            ),
            (
                "redis+sentinel://:se/cret@h/m",
                "redis+sentinel://(unparsable; hidden)",
            ),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }
}
