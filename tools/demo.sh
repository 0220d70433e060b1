#!/bin/bash
# Show the main job: two read-only lower dirs merged with a writable upper by overlayfuse.
# Edits through the mount (create, modify a lower file, delete a lower file) land in the upper
# dir only, in the kernel's on-disk format (a deleted lower file becomes a 0,0 character device,
# a "whiteout"). Then the layer store on top: a cached build from a step file (COPY, ENV), a
# rebuild after an input changed, a snapshot and a rollback. Everything is created in a temp
# dir and removed on any exit.
# OVERLAYFUSE_BACKEND=kernel|auto picks another backend (default: fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH"
backend=${OVERLAYFUSE_BACKEND:-fuse}

demo=$(mktemp -d /tmp/overlayfuse-demo.XXXXXX)
cleanup() {
  if mountpoint -q "$demo/merged" 2>/dev/null; then
    overlayfuse umount "$demo/merged" 2>/dev/null || fusermount3 -u "$demo/merged" 2>/dev/null \
      || umount -l "$demo/merged"
  fi
  rm -rf "$demo"
}
trap cleanup EXIT
cd "$demo"

show() { printf '\n$ %s\n' "$*"; "$@"; }
run() { printf '\n$ %s\n' "$1"; eval "$1"; }  # for commands with redirections
tree() {  # type, mode and content (or device numbers) of every entry, sorted
  (cd "$1" && find . -mindepth 1 | sort | while read -r p; do
    if [ -c "$p" ]; then printf '  %-16s c %s,%s' "${p#./}" "$(stat -c %t "$p")" "$(stat -c %T "$p")"
      [ "$(stat -c %t,%T "$p")" = 0,0 ] && printf '   (whiteout)'
    elif [ -d "$p" ]; then printf '  %-16s d' "${p#./}/"
    else printf '  %-16s f %s' "${p#./}" "$(tr '\n' ' ' < "$p")"
    fi
    echo
  done)
}

mkdir lower1 lower2 upper work merged
echo "from lower2 (bottom)" > lower2/shared.txt
echo "only in lower2" > lower2/old.txt
mkdir lower2/docs && echo "guide" > lower2/docs/guide.txt
echo "from lower1 (top wins)" > lower1/shared.txt
echo "config v1" > lower1/config
echo "== layers in $demo"
for d in lower1 lower2; do echo "$d:"; tree $d; done
before=$(cd lower1 && find . -exec stat -c '%n %s %Y' {} + ; cd ../lower2 && find . -exec stat -c '%n %s %Y' {} +)

show overlayfuse mount --backend "$backend" \
  -o "lowerdir=$demo/lower1:$demo/lower2,upperdir=$demo/upper,workdir=$demo/work" "$demo/merged"
grep " $demo/merged " /proc/mounts

echo; echo "== the merged tree"
show ls -l merged
show cat merged/shared.txt

echo; echo "== edit it"
run 'echo "new file" > merged/new.txt'
run 'echo "config v2" > merged/config'
show rm merged/old.txt
show mkdir merged/docs/more
show ls -l merged merged/docs

echo; echo "== the lower dirs are unchanged"
after=$(cd lower1 && find . -exec stat -c '%n %s %Y' {} + ; cd ../lower2 && find . -exec stat -c '%n %s %Y' {} +)
if [ "$before" = "$after" ]; then echo "  lower1 and lower2: unchanged"; else echo "  LOWER DIRS CHANGED"; exit 1; fi

echo; echo "== what landed in the upper dir (old.txt is now a whiteout)"
tree upper
[ "$(stat -c %F,%t,%T upper/old.txt)" = "character special file,0,0" ]

show overlayfuse umount "$demo/merged"
if mountpoint -q merged; then echo "still mounted"; exit 1; fi

echo; echo "== the layer store: a cached build, the tree as / (the host's programs bound in)"
tools=(); for d in /usr /bin /lib /lib64; do [ -e $d ] && tools+=(--bind "$d:$d:ro"); done
mkdir -p app/conf && echo "port=80" > app/conf/app.conf
printf 'mkdir -p /opt/app\nCOPY conf /opt/app/conf\nENV APPVER=1\necho "v$APPVER" > /opt/app/version\n' \
  > app/steps
show cat app/steps
store=(--base "$demo/store" --config app)
show overlayfuse build "${store[@]}" "${tools[@]}" --tag v1 app/steps
run 'echo "port=8080" > app/conf/app.conf   # an input changed: that step and the rest run again'
show overlayfuse build "${store[@]}" "${tools[@]}" app/steps
show overlayfuse store "${store[@]}" run "${tools[@]}" -- cat /opt/app/conf/app.conf
show overlayfuse store "${store[@]}" rollback v1
show overlayfuse store "${store[@]}" run "${tools[@]}" -- cat /opt/app/conf/app.conf
[ "$(overlayfuse store "${store[@]}" run "${tools[@]}" -- cat /opt/app/conf/app.conf)" = port=80 ]
show overlayfuse build --base "$demo/store" --list
echo; echo "demo done: unmounted, and $demo is removed on exit"
