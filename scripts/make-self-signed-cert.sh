#!/bin/sh
# Make a self-signed TLS certificate for nginx (testing only: clients must trust it by hand).
#
#   scripts/make-self-signed-cert.sh [OUT_DIR] [HOSTNAME]
#
# Writes OUT_DIR/server.crt and OUT_DIR/server.key (default OUT_DIR: nginx/certs next to this
# script; default HOSTNAME: localhost). The certificate is valid for HOSTNAME, localhost,
# 127.0.0.1 and ::1 for DAYS (default 365) days. Existing files are replaced.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../nginx/certs"}
name=${2:-localhost}
days=${DAYS:-365}

command -v openssl >/dev/null 2>&1 || { echo "make-self-signed-cert: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
[ "$name" = localhost ] || san="DNS:$name,$san"

umask 077
openssl req -x509 -nodes -newkey rsa:2048 -sha256 -days "$days" \
    -subj "/CN=$name" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$out/server.key" -out "$out/server.crt" 2>/dev/null
chmod 644 "$out/server.crt"
chmod 600 "$out/server.key"

echo "wrote $out/server.crt and $out/server.key (CN=$name, $san, $days days)"
