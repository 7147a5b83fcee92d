"""The write side of a local Hugging Face Hub, in front of olah (test infrastructure).

olah (PyPI `olah`) serves the Hub's read API (`/api/...`, `/{repo}/resolve/...`) from plain git repositories kept
under its `mirrors-path` (`{mirrors}/{models,datasets,spaces}/{org}/{name}`), offline. It accepts no uploads: this
server adds what `huggingface_hub` calls to create a repository and commit to it, and writes each commit into the
git repository that olah serves (plain git blobs, no LFS, no Xet):

    POST /api/repos/create                          create_repo: a bare repository whose `main` holds an empty
                                                    initial commit (a new Hub repo has a `main` branch too)
    POST /api/validate-yaml                         create_commit checks a README.md's metadata before uploading
    POST /api/{type}s/{org}/{name}/preupload/{rev}  upload modes: "regular" for every file, so contents come inline
                                                    in the commit; `oid` (git blob id) lets the client skip a file
                                                    that has not changed
    POST /api/{type}s/{org}/{name}/commit/{rev}     NDJSON: a header line, then `file` (base64), `deletedFile` and
                                                    `deletedFolder` operations -> one git commit on branch {rev}

Every other request is forwarded to olah unchanged, except three answers olah 0.5.4 gets wrong for a mirrored
repository in offline mode, which are corrected here from the same git repository:

    GET|HEAD /api/{type}s/{org}/{name}                  olah looks only in its download cache (401 RepoNotFound):
                                                        forwarded as .../revision/main, which olah reads from git
    GET|HEAD /[{type}s/]{org}/{name}/resolve/{rev}/{path}  a path the revision lacks: olah answers 401 RepoNotFound
    GET|HEAD /api/{type}s/{org}/{name}/tree/{rev}/{path}   (HEAD, tree) or 500 (GET); the Hub answers 404 with
                                                        X-Error-Code EntryNotFound (RevisionNotFound for an unknown
                                                        revision), which clients rely on to tell a missing optional
                                                        file from a missing repository

Usage: python gateway.py --mirrors DIR --olah http://127.0.0.1:PORT [--port N]
"""

import argparse
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPE_DIRS = {"model": "models", "dataset": "datasets", "space": "spaces"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Headers that describe one connection, not the message: never forwarded in either direction.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "local hub", "GIT_AUTHOR_EMAIL": "hub@localhost",
                "GIT_COMMITTER_NAME": "local hub", "GIT_COMMITTER_EMAIL": "hub@localhost",
                "GIT_CONFIG_NOSYSTEM": "1"}


class HubError(Exception):
    """An error answered the way the Hub does: status, X-Error-Code / X-Error-Message headers, JSON body."""

    def __init__(self, status, message, code=None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class GitRepos:
    """The git repositories olah serves, and the git plumbing that writes commits into them."""

    def __init__(self, root):
        self.root = Path(root)
        self.lock = threading.Lock()  # one writer at a time: commits of a branch are serialised

    def path(self, type_dir, org, name):
        if not (NAME.fullmatch(org) and NAME.fullmatch(name)):
            raise HubError(400, f"invalid repository id {org}/{name}")
        return self.root / type_dir / org / name

    def find(self, type_dir, org, name):
        """The git repository of a repo id this Hub holds, or None."""
        valid = NAME.fullmatch(org) and NAME.fullmatch(name)
        return self.root / type_dir / org / name if valid and (self.root / type_dir / org / name).is_dir() else None

    def git(self, repo, *args, stdin=None, env=None, check=True):
        result = subprocess.run(["git", f"--git-dir={repo}", *args], input=stdin, capture_output=True,
                                env={**os.environ, **GIT_IDENTITY, **(env or {})})
        if check and result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def create(self, repo):
        with self.lock:
            repo.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(repo)], check=True)
            empty_tree = self.git(repo, "hash-object", "-t", "tree", "-w", "--stdin", stdin=b"")
            initial = self.git(repo, "commit-tree", empty_tree, "-m", "initial commit")
            self.git(repo, "update-ref", "refs/heads/main", initial)

    def resolve(self, repo, revision):
        """The commit a branch, tag or commit id names, or None."""
        return self.git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)

    def entries(self, repo, revision):
        """{path: (type, object id)} of every file and folder at `revision`, or None when it does not exist."""
        commit = self.resolve(repo, revision)
        if commit is None:
            return None
        listing = self.git(repo, "ls-tree", "-r", "-t", "-z", commit)
        entries = {}
        for line in filter(None, listing.split("\0")):
            meta, path = line.split("\t", 1)
            _, kind, oid = meta.split()
            entries[path] = (kind, oid)
        return entries

    def commit(self, repo, branch, operations, message, parent_commit=None):
        """Apply the NDJSON operations of one commit on top of `branch`; returns the new commit id."""
        with self.lock, tempfile.TemporaryDirectory() as scratch:
            index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
            head = self.resolve(repo, f"refs/heads/{branch}")
            if head is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent_commit and parent_commit != head:
                raise HubError(412, f"parent commit {parent_commit} is not the head of {branch} ({head})")
            self.git(repo, "read-tree", head, env=index)
            for operation in operations:
                key, value = operation["key"], operation["value"]
                path = value["path"]
                if path.startswith("/") or ".." in path.split("/") or ".git" in path.split("/"):
                    raise HubError(400, f"invalid path in repository: {path!r}")
                if key == "file":
                    content = value["content"]
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    oid = self.git(repo, "hash-object", "-w", "--stdin", stdin=data)
                    self.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{oid},{path}", env=index)
                elif key in ("deletedFile", "deletedFolder"):
                    pattern = path.rstrip("/") + ("/" if key == "deletedFolder" else "")
                    tracked = self.git(repo, "ls-files", "-z", "--", pattern, env=index).split("\0")
                    tracked = [name for name in tracked if name]
                    if not tracked:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    removals = "".join(f"0 {'0' * 40}\t{name}\0" for name in tracked)  # mode 0: remove
                    self.git(repo, "update-index", "-z", "--index-info", stdin=removals.encode(), env=index)
                else:  # lfsFile: never requested, every file is "regular" (see preupload)
                    raise HubError(400, f"commit operation {key!r} is not supported by this test server")
            tree = self.git(repo, "write-tree", env=index)
            commit = self.git(repo, "commit-tree", tree, "-p", head, stdin=message.encode())
            self.git(repo, "update-ref", f"refs/heads/{branch}", commit, head)
            return commit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length
    server: "Gateway"

    # -- dispatch -------------------------------------------------------------------------------------------------

    def do_GET(self):
        path = urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            for methods, pattern, handler in ROUTES:
                match = pattern.fullmatch(path)
                if self.command in methods and match:
                    return handler(self, body, **match.groupdict())
            self.forward(body)
        except HubError as error:
            self.send_json(error.status, {"error": error.message, **error.body},
                           {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})})
        except Exception as error:  # a bug here or a failed git call: say so, rather than drop the connection
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}".replace("\n", " ")[:500]
            self.send_json(500, {"error": message}, {"X-Error-Message": message})

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- helpers --------------------------------------------------------------------------------------------------

    def send_json(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def base_url(self):
        return f"http://{self.headers['Host']}"

    def repo_url(self, type_dir, org, name):
        return f"{self.base_url()}{'' if type_dir == 'models' else '/' + type_dir}/{org}/{name}"

    def existing_repo(self, type_dir, org, name):
        repo = self.server.repos.find(type_dir, org, name)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def forward(self, body, path=None):
        """Send the request on to olah and its answer back to the client."""
        connection = http.client.HTTPConnection(self.server.olah.hostname, self.server.olah.port, timeout=120)
        try:
            # Host is kept, so that olah's redirects (e.g. to a path with a trailing slash) come back here
            headers = {key: value for key, value in self.headers.items()
                       if key.lower() not in HOP_BY_HOP | {"content-length"}}
            connection.request(self.command, path or self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()  # empty for HEAD; files here are small, so whole answers are buffered
            # send_response writes Date and Server; the Content-Length of a HEAD answer is olah's (the size of the
            # file it describes), that of any other answer is the length of the body sent
            skip = HOP_BY_HOP | {"date", "server"} | ({"content-length"} if self.command != "HEAD" else set())
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in skip:
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            elif response.getheader("Content-Length") is None:
                self.send_header("Content-Length", "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            connection.close()

    # -- the write API --------------------------------------------------------------------------------------------

    def create_repo(self, body):
        payload = json.loads(body)
        type_dir = REPO_TYPE_DIRS[payload.get("type") or "model"]
        org, name = payload.get("organization") or "user", payload["name"]
        repo = self.server.repos.path(type_dir, org, name)
        url = self.repo_url(type_dir, org, name)
        if repo.exists():
            raise HubError(409, f"You already created this {type_dir[:-1]} repo", url=url)
        self.server.repos.create(repo)
        self.send_json(200, {"url": url, "name": f"{org}/{name}"})

    def validate_yaml(self, body):
        content = json.loads(body)["content"]
        front_matter = re.match(r"\s*---\r?\n(.*?)\r?\n---\s*(\n|$)", content, re.S)
        errors = []
        if front_matter:
            try:
                metadata = yaml.safe_load(front_matter.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append("the metadata block must be a YAML mapping")
            except yaml.YAMLError as error:
                errors.append(f"invalid YAML metadata: {error}")
        status = 400 if errors else 200
        self.send_json(status, {"errors": [{"message": message} for message in errors], "warnings": []})

    def preupload(self, body, type_dir, org, name, revision):
        repo = self.existing_repo(type_dir, org, name)
        entries = self.server.repos.entries(repo, unquote(revision)) or {}
        files = []
        for file in json.loads(body)["files"]:
            kind, oid = entries.get(file["path"], (None, None))
            files.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": oid if kind == "blob" else None})
        self.send_json(200, {"files": files})

    def commit(self, body, type_dir, org, name, revision):
        repo = self.existing_repo(type_dir, org, name)
        if parse_qs(urlsplit(self.path).query).get("create_pr"):
            raise HubError(400, "pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
        commit = self.server.repos.commit(repo, unquote(revision), lines[1:], message, header.get("parentCommit"))
        self.send_json(200, {"success": True, "commitOid": commit, "pullRequestUrl": None,
                             "commitUrl": f"{self.repo_url(type_dir, org, name)}/commit/{commit}"})

    # -- corrections of olah's answers for mirrored repositories --------------------------------------------------

    def repo_info(self, body, type_dir, org, name):
        if self.server.repos.find(type_dir, org, name):
            query = urlsplit(self.path).query
            return self.forward(body, f"/api/{type_dir}/{org}/{name}/revision/main" + (f"?{query}" if query else ""))
        self.forward(body)

    def check_entry(self, type_dir, org, name, revision, path, kind):
        repo = self.server.repos.find(type_dir, org, name)
        if repo is None:
            return  # not ours: olah answers (RepoNotFound)
        revision, path = unquote(revision), unquote(path).strip("/")
        entries = self.server.repos.entries(repo, revision)
        if entries is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if path and entries.get(path, (None,))[0] != kind:
            raise HubError(404, f"{path} does not exist on \"{revision}\"", "EntryNotFound")

    def resolve(self, body, type_dir, org, name, revision, path):
        self.check_entry(type_dir or "models", org, name, revision, path, "blob")
        self.forward(body)

    def tree(self, body, type_dir, org, name, revision, path=""):
        self.check_entry(type_dir, org, name, revision, path or "", "tree")
        self.forward(body)


REPO = r"(?P<type_dir>models|datasets|spaces)/(?P<org>[^/]+)/(?P<name>[^/]+)"
ROUTES = [
    ({"POST"}, re.compile(r"/api/repos/create"), Handler.create_repo),
    ({"POST"}, re.compile(r"/api/validate-yaml"), Handler.validate_yaml),
    ({"POST"}, re.compile(rf"/api/{REPO}/preupload/(?P<revision>[^/]+)"), Handler.preupload),
    ({"POST"}, re.compile(rf"/api/{REPO}/commit/(?P<revision>[^/]+)"), Handler.commit),
    ({"GET", "HEAD"}, re.compile(rf"/api/{REPO}"), Handler.repo_info),
    ({"GET", "HEAD"}, re.compile(rf"/api/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?"), Handler.tree),
    ({"GET", "HEAD"}, re.compile(r"(?:/(?P<type_dir>datasets|spaces))?/(?P<org>[^/]+)/(?P<name>[^/]+)"
                                 r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)"), Handler.resolve),
]


class Gateway(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, mirrors, olah_url):
        super().__init__(address, Handler)
        self.repos = GitRepos(mirrors)
        self.olah = urlsplit(olah_url)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", required=True, help="olah's mirrors-path: {models,datasets,spaces}/{org}/{name}")
    parser.add_argument("--olah", required=True, help="olah's URL, e.g. http://127.0.0.1:8090")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    server = Gateway((args.host, args.port), args.mirrors, args.olah)
    print(f"gateway listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
