"""A real MIT Kerberos KDC for the Kerberos (SPNEGO `Authorization: Negotiate`) tests.

Debian's `krb5kdc`, `kdb5_util`, `kadmin.local` and `kinit` (installed by `tests/env/kdc`), run
unprivileged-style: every file (krb5.conf, kdc.conf, database, stash, log, keytab, ccaches) lives
in the given directory and the KDC listens on a free loopback TCP port only, so several can run
at once and nothing under /etc or /var is used.

    with Kdc(tmp_path) as kdc:            # realm DGRS.TEST, users alice/bob, HTTP/127.0.0.1
        ccache = kdc.kinit("alice")       # a TGT for alice@DGRS.TEST (password on kinit's stdin)
        kdc.keytab                        # the service keytab: the gateway's kerberos keytab
        kdc.server_env()                  # KRB5_CONFIG, KRB5_KTNAME, KRB5RCACHEDIR for the server
        for k, v in kdc.env(ccache).items():
            monkeypatch.setenv(k, v)      # KRB5_CONFIG + KRB5CCNAME: the stock client is alice

MIT reads KRB5_CONFIG/KRB5CCNAME on every GSS call, so changing them in the test process
switches the in-process client's identity (checked: alice then bob in one process).

Service principal naming (what the stock client asks for): `dask_gateway.auth.KerberosAuth`
calls `kerberos.authGSSClientInit("HTTP@" + <host of the gateway URL>)`, a host-based name, so
`http://127.0.0.1:8000` needs `HTTP/127.0.0.1@DGRS.TEST`. The krb5.conf written here turns off
DNS canonicalization and reverse DNS (`dns_canonicalize_hostname = false`, `rdns = false`):
otherwise MIT maps 127.0.0.1 to `localhost` by reverse lookup and asks for HTTP/localhost.
Note that pykerberos uses the raw Kerberos mechanism (OID 1.2.840.113554.1.2.2) by default, not
SPNEGO, so the token after `Negotiate ` is a bare krb5 AP-REQ; the acceptor must allow it.
"""

import atexit
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ports import free_port

REPO = Path(__file__).resolve().parents[2]

DEFAULT_USERS = {"alice": "alice-password", "bob": "bob-password"}


def kdc_sbin():
    """The directory with krb5kdc/kdb5_util/kadmin.local, installing the packages if missing."""
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if all(os.access(os.path.join(d, b), os.X_OK) for b in ("krb5kdc", "kdb5_util",
                                                                "kadmin.local")) \
                and shutil.which("kinit"):
            return d
    out = subprocess.run([str(REPO / "tests" / "env" / "kdc")], check=True, text=True,
                         stdout=subprocess.PIPE, timeout=900)
    return out.stdout.strip().splitlines()[-1]


class KdcError(Exception):
    """A Kerberos admin or client command failed."""


class Kdc:
    """One MIT KDC (`krb5kdc -n`) with its realm, users and HTTP service keytab in `tmpdir`."""

    def __init__(self, tmpdir, realm="DGRS.TEST", hosts=("127.0.0.1",), users=None,
                 start=True):
        """`hosts`: one `HTTP/<host>@realm` service principal each, all in `self.keytab`.
        `users`: {name: password}, default alice/bob. `start=False`: call `start()` yourself."""
        self.dir = Path(tmpdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.realm = realm
        self.hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.krb5_conf = self.dir / "krb5.conf"
        self.kdc_conf = self.dir / "kdc.conf"
        self.keytab = self.dir / "http.keytab"
        self.log = self.dir / "krb5kdc.log"
        self.rcache_dir = self.dir / "rcache"
        self.port = None
        self.proc = None
        self._sbin = None
        if start:
            self.start()

    # -- environment -----------------------------------------------------------------------
    def _admin_env(self):
        env = dict(os.environ)
        env.update(KRB5_CONFIG=str(self.krb5_conf), KRB5_KDC_PROFILE=str(self.kdc_conf))
        env.pop("KRB5CCNAME", None)
        env.pop("KRB5_KTNAME", None)
        return env

    def env(self, ccache=None):
        """Variables for a client process (or `monkeypatch.setenv` in this one): the config
        pointing at this KDC and, given a ccache from `kinit`, that ticket cache."""
        out = {"KRB5_CONFIG": str(self.krb5_conf)}
        if ccache is not None:
            out["KRB5CCNAME"] = f"FILE:{ccache}"
        return out

    def server_env(self):
        """Variables for the gateway (acceptor) process: config, service keytab, and a replay
        cache directory of its own (MIT's default is /var/tmp, shared by everything)."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KTNAME": f"FILE:{self.keytab}",
            "KRB5RCACHEDIR": str(self.rcache_dir),
        }

    def principal(self, name):
        return name if "@" in name else f"{name}@{self.realm}"

    def service_principal(self, host="127.0.0.1"):
        return f"HTTP/{host}@{self.realm}"

    # -- lifecycle -------------------------------------------------------------------------
    def _write_config(self):
        d = self.dir
        domain_realm = "".join(f"    {h} = {self.realm}\n" for h in self.hosts)
        self.krb5_conf.write_text(f"""\
[libdefaults]
    default_realm = {self.realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    ignore_acceptor_hostname = false
    udp_preference_limit = 1
    forwardable = false
    default_ccache_name = FILE:{d}/ccache.default
    default_keytab_name = FILE:{self.keytab}

[realms]
    {self.realm} = {{
        kdc = 127.0.0.1:{self.port}
    }}

[domain_realm]
{domain_realm}""")
        self.kdc_conf.write_text(f"""\
[kdcdefaults]
    kdc_listen = ""
    kdc_tcp_listen = 127.0.0.1:{self.port}

[realms]
    {self.realm} = {{
        database_name = {d}/principal
        key_stash_file = {d}/stash
        acl_file = {d}/kadm5.acl
        kdc_listen = ""
        kdc_tcp_listen = 127.0.0.1:{self.port}
        max_life = 10h 0m 0s
        max_renewable_life = 1d 0h 0m 0s
        default_principal_flags = +preauth
    }}

[logging]
    kdc = FILE:{self.log}
    default = FILE:{self.log}
""")
        (d / "kadm5.acl").write_text("")

    def _run(self, argv, input=None, env=None, what=None):
        r = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=60,
                           env=env or self._admin_env())
        if r.returncode != 0:
            raise KdcError(f"{what or argv[0]} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}")
        return r.stdout + r.stderr

    def kadmin(self, query):
        """Run one `kadmin.local -q` request on this realm's database (it exits 0 even when
        the request fails, so its messages are checked too)."""
        out = self._run([f"{self._sbin}/kadmin.local", "-r", self.realm, "-q", query],
                        what=f"kadmin.local {query.split()[0]}")
        if re.search(r"error|unknown request|usage:|while ", out, re.I):
            raise KdcError(f"kadmin.local {query!r}: {out.strip()}")
        return out

    def start(self):
        self._sbin = kdc_sbin()
        self.rcache_dir.mkdir(exist_ok=True)
        self.port = free_port()
        self._write_config()
        if not (self.dir / "principal").exists():
            self._run([f"{self._sbin}/kdb5_util", "-r", self.realm, "create", "-s",
                       "-P", "dgrs-master-key"], what="kdb5_util create")
            for user, password in self.users.items():
                self.add_user(user, password)
            for host in self.hosts:
                self.add_service(host)
        self.proc = subprocess.Popen(
            [f"{self._sbin}/krb5kdc", "-n", "-r", self.realm],
            env=self._admin_env(), stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "krb5kdc.out", "ab"), stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise KdcError("krb5kdc did not start: " + self.tail())
                time.sleep(0.05)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def tail(self, n=20):
        lines = []
        for f in (self.dir / "krb5kdc.out", self.log):
            if f.exists():
                lines += f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    # -- principals and tickets ------------------------------------------------------------
    def add_user(self, name, password):
        self.kadmin(f'addprinc -pw "{password}" {self.principal(name)}')
        self.users[name] = password

    def add_service(self, host):
        """Create HTTP/<host>@realm with a random key and add it to `self.keytab`."""
        if host not in self.hosts:
            self.hosts.append(host)
            self._write_config()
        princ = self.service_principal(host)
        self.kadmin(f"addprinc -randkey {princ}")
        self.kadmin(f"ktadd -k {self.keytab} {princ}")

    def kinit(self, user, ccache=None, password=None, lifetime=None):
        """Get a TGT for `user` with its password (typed on kinit's stdin, as a user would) into
        `ccache` (default <tmpdir>/ccache.<user>); returns the ccache path."""
        ccache = Path(ccache) if ccache else self.dir / f"ccache.{user}"
        if password is None:
            password = self.users[user]
        argv = ["kinit", "-c", f"FILE:{ccache}"]
        if lifetime:
            argv += ["-l", str(lifetime)]
        self._run(argv + [self.principal(user)], input=password + "\n",
                  env={**self._admin_env(), **self.env()}, what=f"kinit {user}")
        return ccache

    def klist(self, ccache):
        return self._run(["klist", "-c", f"FILE:{ccache}"], env={**self._admin_env(),
                                                                **self.env()})
