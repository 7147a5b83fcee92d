"""Which model names the example scripts treat as local folders: a name meant as a folder that is not there fails
at once with "no such folder" instead of being looked up on the Hub."""

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


def missing_local_folder(name):
    """True when `name` is meant as a local folder and there is none: it starts with ./, ../, / or ~, has more
    than one path separator or characters an owner/name Hub id cannot have, or its first part is an existing
    folder (outputs/nope when outputs/ exists). A Hub id (owner/name, or a bare name) is left to the Hub."""
    if os.path.exists(os.path.expanduser(name)):
        return False
    normal = name.replace(os.sep, "/") if os.sep != "/" else name
    if normal in (".", "..") or normal.startswith(("./", "../", "/", "~")) or os.path.isabs(name):
        return True
    parts = normal.split("/")
    if len(parts) == 1:
        return False
    return len(parts) > 2 or not HUB_ID.fullmatch(normal) or os.path.isdir(parts[0])
