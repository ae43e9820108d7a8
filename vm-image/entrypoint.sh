#!/bin/sh
# Starts the project VM's sshd in the foreground: a host key of this VM's own (made on first
# start, never baked into the image) and agentd's public key for "coder".
set -eu

if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
fi

# AUTHORIZED_KEYS holds public keys (one a line); without it, mount the file instead.
keys=/home/coder/.ssh/authorized_keys
if [ -n "${AUTHORIZED_KEYS:-}" ]; then
    (umask 077 && printf '%s\n' "$AUTHORIZED_KEYS" > "$keys")
    chown coder:coder "$keys"
elif [ ! -f "$keys" ]; then
    echo "agentd-vm: no key for coder: set AUTHORIZED_KEYS or mount $keys" >&2
fi

# sshd's privilege separation directory; /run may be a fresh tmpfs.
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config
