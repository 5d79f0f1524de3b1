# shellcheck shell=bash
# Sourced by the import and registry benchmarks: an OCI image layout "$work/layout:nginx"
# assembled with umoci from the files of Debian's nginx package set as installed on
# this machine (apt's --no-install-recommends closure of nginx), the way a
# container image of nginx is made from packages.
nginx_layout() {
  local root=$work/nginx-root p
  mkdir -p "$root"
  for p in $(apt-get -s -o Dir::State::status=/dev/null install --no-install-recommends nginx 2>/dev/null | awk '/^Inst/ {print $2}'); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || continue
    dpkg -L "$p" 2>/dev/null | while read -r f; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      [ -d "$f" ] && continue   # directories, and links to them, come with their files
      cp -a --parents "$f" "$root/" 2>/dev/null || true
    done
  done
  mkdir -p "$root/etc" "$root/var/log/nginx" "$root/var/lib/nginx" "$root/run"
  printf 'root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nwww-data:x:33:\n' >"$root/etc/group"
  (cd "$work" && umoci init --layout layout >/dev/null && umoci new --image layout:nginx >/dev/null &&
    umoci unpack --image layout:nginx bundle >/dev/null)
  cp -a "$root/." "$work/bundle/rootfs/"
  (cd "$work" && umoci repack --image layout:nginx bundle >/dev/null &&
    umoci config --image layout:nginx --config.entrypoint /usr/sbin/nginx \
      --config.cmd=-g --config.cmd='daemon off;' --config.exposedports 80/tcp >/dev/null)
  rm -rf "$work/bundle" "$root"
}
