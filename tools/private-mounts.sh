#!/bin/bash
# private-mounts.sh CMD...: run CMD (as root) in a mount namespace of its own.
#
# Any process that creates a mount namespace while a FUSE mount exists gets a copy of that
# mount, and the copy keeps the FUSE connection alive after the mount's own unmount: the
# daemon then rightly waits for requests, and a test that expects it to exit fails (seen when
# another run did `unshare --mount` while the suite was mid-test). In a namespace of its own the
# suite's mounts are invisible to namespaces made elsewhere, and all of them vanish with it.
# The copies of other FUSE and overlay mounts that the new namespace starts with are detached
# from it (never the root or a mount holding the checkout), so the suite pins nobody else's.
# Not root, or already inside: CMD runs as it is.
set -euo pipefail
if [ "$(id -u)" != 0 ] || [ -n "${OVERLAYFUSE_PRIVATE_MOUNTS:-}" ] || ! command -v unshare >/dev/null; then
  exec "$@"
fi
export OVERLAYFUSE_PRIVATE_MOUNTS=1
exec unshare --mount --propagation private bash -c '
here=$(pwd -P)
awk '"'"'$3 ~ /^(fuse|overlay)/ {print $2}'"'"' /proc/self/mounts | sort -r | while read -r m; do
  m=$(printf "%b" "$m")
  case "$here/" in "$m"/*) continue ;; esac
  [ "$m" = / ] || umount -l "$m" 2>/dev/null || true
done
exec "$@"' private-mounts "$@"
