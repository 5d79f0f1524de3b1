//! Who may write what in etcd: users and roles for etcd's own access control, which with
//! `--client-cert-auth` takes a client certificate's common name as its user.
//!
//! - `root` (the operator's certificate, [`crate::certs::OPERATOR_USER`]): everything,
//!   including users, roles and `juice fleet apply`'s `spec`.
//! - `host-<id>` (a host's certificate) holds the role `host-<id>`: it reads everything
//!   under `/juice/v1/` and writes only its own record (`hosts/<id>`), its own reports
//!   (`reports/<id>/`), the update slots (`update/slots/`) and its own `update/failed/<id>`.
//! - the role `controller`, given to the hosts that stand as controller: reads and writes
//!   everything under `/juice/v1/`.
//!
//! [`Store::auth_setup`] makes `root` and `controller` and enables auth;
//! [`Store::auth_host`] adds one host; [`Store::auth_remove`] takes one away.

use etcd_client::{Permission, UserAddOptions};

use crate::certs::{OPERATOR_USER, host_user};
use crate::error::Result;
use crate::record::{HOSTS, HostId, PREFIX};
use crate::report::REPORTS;
use crate::store::Store;

/// The role of the hosts that stand as the fleet's controller.
pub const CONTROLLER_ROLE: &str = "controller";
/// The update slots a host takes under its own lease ([`crate::update`]).
pub const UPDATE_SLOTS: &str = crate::update::SLOTS;

/// One permission of a role: on `key`, or on every key starting with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub write: bool,
    pub key: String,
    pub prefix: bool,
}

impl Grant {
    fn read_prefix(key: &str) -> Grant {
        Grant {
            write: false,
            key: key.to_owned(),
            prefix: true,
        }
    }

    fn write_prefix(key: &str) -> Grant {
        Grant {
            write: true,
            key: key.to_owned(),
            prefix: true,
        }
    }

    fn permission(&self) -> Permission {
        let p = if self.write {
            Permission::read_write(self.key.as_str())
        } else {
            Permission::read(self.key.as_str())
        };
        if self.prefix { p.with_prefix() } else { p }
    }
}

/// What the role `host-<id>` may do. Reading `/juice/v1/` covers what a host reads (its
/// assignments, the spec, the controller's key) and what it may come to read; it reveals
/// the other hosts' records, assignments and reports, which hold nothing secret.
pub fn host_grants(id: &HostId) -> Vec<Grant> {
    vec![
        Grant::read_prefix(PREFIX),
        Grant {
            write: true,
            key: format!("{HOSTS}{id}"),
            prefix: false,
        },
        Grant::write_prefix(&format!("{REPORTS}{id}/")),
        Grant::write_prefix(UPDATE_SLOTS),
        // Its own failed update, which pauses the fleet's update until the operator resumes.
        Grant {
            write: true,
            key: format!("{}{id}", crate::update::FAILED),
            prefix: false,
        },
    ]
}

/// What the role `controller` may do: everything the fleet holds.
pub fn controller_grants() -> Vec<Grant> {
    vec![Grant::write_prefix(PREFIX)]
}

/// Whether `grants` let their holder write `key` (as etcd judges a put or a delete).
pub fn may_write(grants: &[Grant], key: &str) -> bool {
    grants
        .iter()
        .any(|g| g.write && (key == g.key || (g.prefix && key.starts_with(&g.key))))
}

/// etcd's answer to adding what is already there.
fn exists(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.message().contains("already exists"))
}

fn missing(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.message().contains("not found"))
}

const WHAT: &str = "the fleet's users and roles";

impl Store {
    /// Makes `root` (with etcd's `root` role) and the role `controller`, then enables
    /// etcd's auth. Run with the operator's certificate, before any host joins (until auth
    /// is enabled, every certificate from the fleet's CA may write anything). Running it
    /// again changes nothing.
    pub async fn auth_setup(&self) -> Result<()> {
        self.role(CONTROLLER_ROLE, &controller_grants()).await?;
        self.user(OPERATOR_USER).await?;
        self.role(OPERATOR_USER, &[]).await?;
        let mut client = self.client();
        self.call(WHAT, client.user_grant_role(OPERATOR_USER, OPERATOR_USER))
            .await?;
        self.call("enabling auth", client.auth_enable()).await?;
        Ok(())
    }

    /// Lets the host `id` (its certificate's user `host-<id>`) write its own records, and
    /// with `controller` everything under `/juice/v1/`. Running it again changes nothing.
    pub async fn auth_host(&self, id: &HostId, controller: bool) -> Result<()> {
        let user = host_user(id);
        self.role(&user, &host_grants(id)).await?;
        self.user(&user).await?;
        let mut client = self.client();
        self.call(WHAT, client.user_grant_role(user.as_str(), user.as_str()))
            .await?;
        if controller {
            self.call(WHAT, client.user_grant_role(user.as_str(), CONTROLLER_ROLE))
                .await?;
        }
        Ok(())
    }

    /// Takes the host `id`'s user and role away: its certificate can then do nothing.
    pub async fn auth_remove(&self, id: &HostId) -> Result<()> {
        let user = host_user(id);
        let mut client = self.client();
        for r in [
            self.call(WHAT, client.user_delete(user.as_str()))
                .await
                .map(drop),
            self.call(WHAT, client.role_delete(user.as_str()))
                .await
                .map(drop),
        ] {
            match r {
                Err(e) if !missing(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    async fn role(&self, name: &str, grants: &[Grant]) -> Result<()> {
        let mut client = self.client();
        match self.call(WHAT, client.role_add(name)).await {
            Err(e) if !exists(&e) => return Err(e),
            _ => {}
        }
        for g in grants {
            self.call(WHAT, client.role_grant_permission(name, g.permission()))
                .await?;
        }
        Ok(())
    }

    async fn user(&self, name: &str) -> Result<()> {
        let mut client = self.client();
        // No password: the user is who a certificate's common name says.
        let options = UserAddOptions::new().with_no_pwd();
        match self
            .call(WHAT, client.user_add(name, "", Some(options)))
            .await
        {
            Err(e) if !exists(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{ASSIGN, LEADER, SPEC};

    #[test]
    fn a_host_may_write_only_its_own_record_reports_and_the_update_slots() {
        let a: HostId = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".parse().unwrap();
        let b: HostId = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".parse().unwrap();
        let g = host_grants(&a);
        for (key, ok) in [
            (format!("{HOSTS}{a}"), true),
            (format!("{REPORTS}{a}/web"), true),
            (format!("{UPDATE_SLOTS}{a}"), true),
            (format!("{}{a}", crate::update::FAILED), true),
            (format!("{}{b}", crate::update::FAILED), false),
            (crate::update::DESIRED.to_owned(), false),
            (format!("{HOSTS}{b}"), false),
            // A key that only starts with the host's id is another host's.
            (format!("{HOSTS}{a}x"), false),
            (format!("{REPORTS}{b}/web"), false),
            (format!("{ASSIGN}{a}/web"), false),
            (SPEC.to_owned(), false),
            (LEADER.to_owned(), false),
            ("/other".to_owned(), false),
        ] {
            assert_eq!(may_write(&g, &key), ok, "{key}");
        }
        assert!(g.iter().any(|g| !g.write && g.prefix && g.key == PREFIX));
        assert!(may_write(&controller_grants(), SPEC));
        assert!(!may_write(&controller_grants(), "/juice/v2/spec"));
    }
}
