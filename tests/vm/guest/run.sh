#!/bin/sh
# Runs in the guest at every boot (mesh-test-payload.service). Talks to the
# test over the second serial port: reports `MESH <event> ...` lines and
# waits for `GO <step>` lines. The first boot installs the .deb and joins;
# the next one (after a reboot) only checks that the agent serves again.
set -u
exec 3<>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200
say() { echo "MESH $*" >&3; echo "MESH $*" > /dev/console; }
wait_go() {
  while IFS= read -r line <&3; do
    case "$line" in "GO $1"*) return 0 ;; esac
  done
  return 1
}
wait_ready() {
  i=0
  while [ $i -lt 120 ]; do
    python3 /payload/ready.py && return 0
    sleep 1
    i=$((i + 1))
  done
  # For the test's log: why not.
  systemctl status --no-pager mesh-vm-agent.service > /dev/console 2>&1
  journalctl --no-pager -u mesh-vm-agent.service -n 60 > /dev/console 2>&1
  return 1
}
report_call() { say "$1 $(python3 /payload/call.py 2>&1 | tr '\n' ' ')"; }
# The app's user, no proxy settings: captured transparently.
report_direct() {
  say "$1 $(setpriv --reuid=billing --regid=billing --clear-groups python3 /payload/call.py direct 2>&1 | tr '\n' ' ')"
}
chains() { iptables -t nat -S 2>/dev/null | grep -c '^-A MESH_' || true; }

if [ ! -f /var/lib/mesh-test/joined ]; then
  mkdir -p /var/lib/mesh-test
  say BOOTED first
  say ISOLATED "$(python3 /payload/isolated.py 2>&1 | tr '\n' ' ')"
  install -m 0755 /payload/billing-app.py /usr/local/bin/billing-app
  printf '[Unit]\nDescription=billing (the VM app)\n\n[Service]\nUser=billing\nExecStart=/usr/bin/python3 /usr/local/bin/billing-app\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n' \
    > /etc/systemd/system/billing-app.service
  systemctl enable --now billing-app.service
  if dpkg -i /payload/mesh-vm-agent.deb > /dev/console 2>&1; then say INSTALLED; else say FAILED dpkg; fi
  if systemd-analyze verify /lib/systemd/system/mesh-vm-agent.service > /dev/console 2>&1; then
    say VERIFIED
  else
    say FAILED verify
  fi
  # The one line `mesh vm token create` printed, plus this VM's settings.
  if sh -c "$(cat /payload/join-line) --health-http http://127.0.0.1:18080/health --health-period 1s --workload-api-uid 0 --capture-user billing" > /dev/console 2>&1; then
    say JOINED
  else
    say FAILED join
  fi
  touch /var/lib/mesh-test/joined
  # No systemd-resolved here: what join says to do instead.
  echo "nameserver 127.0.0.153" > /etc/resolv.conf
  say UNIT "$(systemctl is-active mesh-vm-agent.service) $(systemctl is-enabled mesh-vm-agent.service)"
  if wait_ready; then say READY; else say FAILED ready; fi
  report_call CALLED
  report_direct DIRECT
  say RULES "$(chains)"
  wait_go restart
  systemctl restart mesh-vm-agent.service
  if wait_ready; then report_call RESTARTED; else say FAILED restart; fi
  systemctl stop mesh-vm-agent.service
  say STOPPED "$(chains)"
  systemctl start mesh-vm-agent.service
  if wait_ready; then report_direct STARTED; else say FAILED start; fi
  wait_go reboot
  say REBOOTING
  systemctl reboot
else
  say BOOTED again
  if wait_ready; then
    say UNIT "$(systemctl is-active mesh-vm-agent.service) $(systemctl is-enabled mesh-vm-agent.service)"
    report_call REBOOTED
    report_direct REBOOTED_DIRECT
  else
    say FAILED reboot
  fi
  wait_go poweroff
  systemctl poweroff
fi
