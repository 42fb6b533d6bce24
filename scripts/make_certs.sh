#!/usr/bin/env bash
# Make a private CA, a gateway certificate and one certificate per node, for a LAN with TLS.
#
# Usage:
#   scripts/make_certs.sh [-o DIR] [--days N] [--gateway-name NAME]... [--expired] NODE[=NAME,...]...
#
#   -o DIR               where the files go (default: ./certs); created if missing
#   --days N             validity of the certificates made now (default: 825; the CA gets 3650)
#   --gateway-name NAME  another name (DNS name or IP address) the gateway is reached by; repeat
#                        it. The gateway certificate always names localhost and 127.0.0.1.
#   --expired            make the NODE certificates already expired (to see the error it gives)
#   NODE[=NAME,...]      a node_id, and optionally the other names (DNS or IP) its agent is
#                        reached by, e.g. gpu-box-1=10.0.0.12,gpu1.lan
#
# Files in DIR:
#   ca.crt ca.key              the private CA (made once: an existing one is reused, so you can
#                              add nodes later with the same CA)
#   gateway.crt gateway.key    the gateway's certificate (made when missing, or when
#                              --gateway-name is given)
#   NODE.crt NODE.key          one per node: subject CN=NODE and DNS name NODE, plus its names
#
# Every certificate is good for both a server and a client (extendedKeyUsage serverAuth and
# clientAuth): the agent listens with its node certificate and presents the same one to the
# gateway; the gateway presents its own to agents that ask for one. Keys are EC P-256 and are
# written readable by the owner only. Needs openssl 1.1.1 or newer.
set -euo pipefail

out=certs
days=825
expired=0
gateway_names=()
nodes=()

die() { echo "make_certs.sh: $*" >&2; exit 2; }
# run WHAT CMD...: openssl's chatter is hidden, but shown when it fails.
run() {
  local what=$1; shift
  if ! "$@" 2>"$work/openssl.err"; then
    cat "$work/openssl.err" >&2
    die "openssl failed to $what"
  fi
}

while (($#)); do
  case "$1" in
    -o|--out) [[ $# -ge 2 ]] || die "$1 needs a directory"; out=$2; shift 2 ;;
    --days) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--days needs a whole number of days >= 1"
            days=$2; shift 2 ;;
    --gateway-name) [[ $# -ge 2 && -n $2 ]] || die "--gateway-name needs a name"
            gateway_names+=("$2"); shift 2 ;;
    --expired) expired=1; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) nodes+=("$1"); shift ;;
  esac
done

command -v openssl >/dev/null || die "openssl is not installed"
mkdir -p "$out"
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# "a.lan" -> DNS:a.lan, "10.0.0.1" or "::1" -> IP:...
san_entry() {
  if [[ $1 =~ ^[0-9.]+$ || $1 == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}

check_name() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$ ]] \
    || die "'$1' is not a valid name (letters, digits, '.', '_', ':', '@', '-'; at most 128: a node_id)"
}

key() { run "make the key $1" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if [[ ! -f $out/ca.crt || ! -f $out/ca.key ]]; then
  key "$out/ca.key"
  run "make the CA" openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 -subj "/CN=RoleMesh private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"
  echo "made $out/ca.crt (new CA)" >&2
fi

# sign NAME CN SAN EXPIRED: NAME.key (new) and NAME.crt signed by the CA.
sign() {
  local name=$1 cn=$2 san=$3 old=$4
  key "$out/$name.key"
  run "make the request for $name" openssl req -new -key "$out/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
  cat >"$work/$name.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EOF
  if ((old)); then
    # openssl x509 cannot back-date; 'openssl ca' can (a throwaway CA database in $work).
    : >"$work/index.txt"
    cat >"$work/ca.cnf" <<EOF
[ca]
default_ca = d
[d]
database = $work/index.txt
new_certs_dir = $work
serial = $work/serial
default_md = sha256
policy = p
copy_extensions = none
[p]
commonName = supplied
EOF
    openssl rand -hex 16 >"$work/serial"
    run "sign $name (expired)" openssl ca -batch -config "$work/ca.cnf" -cert "$out/ca.crt" \
      -keyfile "$out/ca.key" -in "$work/$name.csr" -out "$out/$name.crt" -extfile "$work/$name.ext" \
      -notext -startdate 20200101000000Z -enddate 20200102000000Z
  else
    run "sign $name" openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$work/$name.ext" \
      -out "$out/$name.crt"
  fi
  chmod 644 "$out/$name.crt"
  echo "made $out/$name.crt ($cn: $san)" >&2
}

if [[ ! -f $out/gateway.crt || ${#gateway_names[@]} -gt 0 ]]; then
  san="DNS:localhost,IP:127.0.0.1"
  for n in "${gateway_names[@]}"; do
    check_name "$n"
    san+=",$(san_entry "$n")"
  done
  sign gateway "${gateway_names[0]:-localhost}" "$san" 0
fi

for spec in "${nodes[@]}"; do
  node=${spec%%=*}
  check_name "$node"
  [[ $node != ca && $node != gateway ]] || die "'$node' is taken by the CA or gateway files; pick another node_id"
  san="DNS:$node"
  if [[ $spec == *=* ]]; then
    IFS=, read -r -a extra <<<"${spec#*=}"
    for n in "${extra[@]}"; do
      check_name "$n"
      san+=",$(san_entry "$n")"
    done
  fi
  sign "$node" "$node" "$san" "$expired"
done
chmod 644 "$out/ca.crt"
