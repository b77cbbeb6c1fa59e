//! Helm and kubectl as the chart tests and the node test run them: the tools from
//! $HERALD_TOOLS_BIN, a release per test namespace, polling for what the cluster does next.

use super::Cluster;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/herald");

/// What a finished command said.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "success={}\nstdout:\n{}\nstderr:\n{}", self.ok, self.stdout, self.stderr)
    }
}

pub fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn tools() -> PathBuf {
    PathBuf::from(std::env::var("HERALD_TOOLS_BIN").unwrap_or_else(|_| {
        panic!("HERALD_TOOLS_BIN is not set: run the chart tests with tests/run.sh, which builds helm and kubectl")
    }))
}

/// helm from the tools directory, talking to the cluster of `kubeconfig`.
pub fn helm(kubeconfig: &Path, args: &[&str]) -> Output {
    run(Command::new(tools().join("helm")).arg("--kubeconfig").arg(kubeconfig).args(args))
}

/// kubectl as whoever `kubeconfig` names.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    run(Command::new(tools().join("kubectl")).arg("--kubeconfig").arg(kubeconfig).args(args))
}

/// Polls `attempt` every half second until it returns Ok, failing the test after `within`
/// with the last Err.
pub async fn eventually<T>(within: Duration, what: &str, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => panic!("{what}: not within {within:?}; last: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A Helm release of the chart in a test namespace, uninstalled when dropped (unless
/// HERALD_TEST_KEEP is set): its cluster-scoped roles would outlive the namespace.
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub kubeconfig: PathBuf,
}

impl Release {
    /// `helm install` without --wait. The release is named after the namespace, which
    /// contains "herald", so the fullname (object name prefix) is the release name and
    /// every test's ClusterRoles have names of their own.
    pub fn install(cluster: &Cluster, namespace: &str, values: &[&str]) -> Release {
        assert!(namespace.contains("herald"), "the fullname is the release name only when it contains the chart name");
        let mut args = vec!["install", namespace, CHART, "--namespace", namespace];
        args.extend(values);
        let out = helm(&cluster.kubeconfig, &args);
        assert!(out.ok, "helm install: {out}");
        Release {
            name: namespace.to_string(),
            namespace: namespace.to_string(),
            kubeconfig: cluster.kubeconfig.clone(),
        }
    }

    pub fn upgrade(&self, values: &[&str]) -> Output {
        let mut args = vec!["upgrade", self.name.as_str(), CHART, "--namespace", self.namespace.as_str()];
        args.extend(values);
        helm(&self.kubeconfig, &args)
    }

    pub fn uninstall(&self) -> Output {
        helm(&self.kubeconfig, &["uninstall", &self.name, "--namespace", &self.namespace])
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if std::env::var_os("HERALD_TEST_KEEP").is_none() {
            // Already gone after a successful uninstall test; nothing to report then.
            let _ = self.uninstall();
        }
    }
}

/// A cluster-scoped object a test created, deleted when dropped (unless HERALD_TEST_KEEP is
/// set): deleting the test namespace would leave it behind.
pub struct ClusterScoped {
    pub kind: &'static str,
    pub name: String,
    pub kubeconfig: PathBuf,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        if std::env::var_os("HERALD_TEST_KEEP").is_none() {
            let _ = kubectl(&self.kubeconfig, &["delete", self.kind, &self.name, "--ignore-not-found"]);
        }
    }
}

impl Release {
    /// A ServiceAccount `client` in the release namespace bound cluster-wide (herald's
    /// reviews name no namespace) to the release's `<fullname>-<role>` ClusterRole, and a
    /// token for it with herald's audience. The binding goes when the guard drops.
    pub fn account_token(&self, cluster: &Cluster, client: &str, role: &str) -> (String, ClusterScoped) {
        let ns = self.namespace.as_str();
        let (ok, _, err) = cluster.kubectl(&["create", "serviceaccount", client, "-n", ns]);
        assert!(ok, "{err}");
        let binding = format!("{ns}-{client}");
        let (ok, _, err) = cluster.kubectl(&[
            "create",
            "clusterrolebinding",
            &binding,
            &format!("--clusterrole={}-{role}", self.name),
            &format!("--serviceaccount={ns}:{client}"),
        ]);
        assert!(ok, "{err}");
        let guard = ClusterScoped { kind: "clusterrolebinding", name: binding, kubeconfig: cluster.kubeconfig.clone() };
        let (ok, token, err) =
            cluster.kubectl(&["create", "token", client, "-n", ns, "--audience", "herald", "--duration", "1h"]);
        assert!(ok, "{err}");
        (token.trim().to_string(), guard)
    }
}
