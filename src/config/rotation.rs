//! How a secret rotated in place reaches the running daemon, for the fix advice that tells a sysadmin to rotate
//! one. A reload (`systemctl reload relay`, SIGHUP) reads an account's files again; but a file under
//! `$CREDENTIALS_DIRECTORY` is systemd's copy of the unit's `LoadCredential=` source, made when the service
//! starts: a reload reads the old copy again, and only a restart makes a new one.

use std::path::Path;

use super::AccountConfig;

/// The command the fix advice names for a rewritten file, as it writes it.
pub const RELOAD: &str = "`systemctl reload relay`";
/// What it names instead for a file that comes through `LoadCredential=`.
pub const RESTART: &str = "`systemctl restart relay` (a reload would not do: the file is systemd's LoadCredential= copy, made only when the service starts)";

/// Which of an account's secret files are `LoadCredential=` copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Their keys, as the fix advice names them (`client_secret_file`).
    copies: Vec<&'static str>,
}

impl Rotation {
    pub fn of(a: &AccountConfig) -> Rotation {
        let files = [
            ("client_secret_file", &a.client_secret_file),
            ("password_file", &a.password_file),
            ("certificate_file", &a.certificate_file),
            ("private_key_file", &a.private_key_file),
            ("service_account_file", &a.service_account_file),
            ("ca_file", &a.ca_file),
        ];
        Rotation {
            copies: files
                .into_iter()
                .filter(|(_, path)| path.as_deref().is_some_and(is_credential))
                .map(|(key, _)| key)
                .collect(),
        }
    }

    /// `fix` as it applies to this account: where it has a file rewritten (it names the file's key) that is a
    /// `LoadCredential=` copy, a restart instead of a reload.
    pub fn advise(&self, fix: &str) -> String {
        if self.copies.iter().any(|key| fix.contains(key)) {
            restarting(fix)
        } else {
            fix.to_string()
        }
    }
}

/// `text` with every reload it advises made a restart.
pub fn restarting(text: &str) -> String {
    text.replace(&format!("{RELOAD} (SIGHUP)"), RESTART)
        .replace(RELOAD, RESTART)
}

/// Whether `path` is one of the unit's credentials: under `$CREDENTIALS_DIRECTORY`, as the config writes it
/// (a command that leaves it unexpanded) or as it was expanded.
pub fn is_credential(path: &Path) -> bool {
    is_credential_in(
        path,
        std::env::var_os("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())
            .as_deref(),
    )
}

fn is_credential_in(path: &Path, dir: Option<&std::ffi::OsStr>) -> bool {
    let written = path.to_str().is_some_and(|p| {
        ["$CREDENTIALS_DIRECTORY", "${CREDENTIALS_DIRECTORY}"]
            .iter()
            .any(|var| {
                p.strip_prefix(var)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    });
    written || dir.is_some_and(|dir| path.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secrets};

    /// An account whose secret and CA are `secret` and `ca`: a credentials path as written, or else a file of that
    /// name made (at 0600) for the config to be valid.
    fn account(secret: &str, ca: &str) -> AccountConfig {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| {
            if name.starts_with('$') {
                return name.to_string();
            }
            let p = dir.path().join(name);
            std::fs::write(&p, "x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p.display().to_string()
        };
        let text = format!(
            "[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"a@example.com\"\nclient_id = \"c\"\nclient_secret_file = {:?}\nca_file = {:?}\ntoken_url = \"https://idp.test/token\"\nsmtp_host = \"smtp.test\"\nscope = \"s\"\n",
            path(secret),
            path(ca)
        );
        // As `relay status` reads it from a shell: a credentials path stays as written.
        let mut c =
            Config::parse_for(&text, "x.toml", Secrets::NotRead).unwrap_or_else(|e| panic!("{e}"));
        c.accounts.remove(0)
    }

    const SECRET_FIX: &str =
        "write its Value to client_secret_file, then `systemctl reload relay` (SIGHUP)";

    #[test]
    fn a_file_under_the_credentials_directory_is_one_of_the_units_credentials() {
        let dir = Some(std::ffi::OsStr::new("/run/credentials/relay.service"));
        for (path, yes) in [
            ("$CREDENTIALS_DIRECTORY/office", true),
            ("${CREDENTIALS_DIRECTORY}/office", true),
            ("/run/credentials/relay.service/office", true),
            ("/run/credentials/relay.service2/office", false),
            ("$CREDENTIALS_DIRECTORYX/office", false),
            ("/etc/relay/secrets/office", false),
        ] {
            assert_eq!(is_credential_in(Path::new(path), dir), yes, "{path}");
        }
        assert!(!is_credential_in(
            Path::new("/run/credentials/relay.service/office"),
            None
        ));
    }

    /// systemd copies a LoadCredential= file when the service starts: rotating the source needs a restart, and
    /// the advice says so; a plain file is read again by a reload, and the advice stays a reload.
    #[test]
    fn a_rotated_credential_needs_a_restart_and_a_plain_file_a_reload() {
        let copied = account("$CREDENTIALS_DIRECTORY/office", "ca.pem");
        let advice = Rotation::of(&copied).advise(SECRET_FIX);
        assert!(
            advice.contains("then `systemctl restart relay`"),
            "{advice}"
        );
        assert!(
            !advice.contains("reload relay`") && !advice.contains("SIGHUP"),
            "{advice}"
        );
        assert!(advice.contains("LoadCredential="), "{advice}");

        let plain = account("office", "ca.pem");
        assert_eq!(Rotation::of(&plain).advise(SECRET_FIX), SECRET_FIX);

        // Only the files the fix has rewritten count: a CA handed over by systemd does not make a secret's a
        // restart.
        let ca_only = account("office", "$CREDENTIALS_DIRECTORY/ca");
        assert_eq!(Rotation::of(&ca_only).advise(SECRET_FIX), SECRET_FIX);
    }

    /// The expiry warnings (log, `relay status`, alerts) take the same advice.
    #[test]
    fn an_expiring_secret_from_the_credentials_directory_is_renewed_with_a_restart() {
        let mut a = account("$CREDENTIALS_DIRECTORY/office", "ca.pem");
        a.client_secret_expires = Some("2027-05-01".into());
        let now = crate::oauth::expiry::parse_date("2027-04-20").unwrap();
        let e = crate::oauth::expiry::expiries(&a);
        let w = crate::oauth::expiry::warning("office", &e[0], now).unwrap();
        assert!(w.contains("then `systemctl restart relay`"), "{w}");
        a.client_secret_file = Some("/etc/relay/secrets/office".into());
        let e = crate::oauth::expiry::expiries(&a);
        let w = crate::oauth::expiry::warning("office", &e[0], now).unwrap();
        assert!(w.contains("then `systemctl reload relay`"), "{w}");
    }
}
