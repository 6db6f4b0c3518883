# Shared by the bench scripts (sourced).

# Waits (up to 60 s) until the server writing its log to $1 reports
# event=serving, and prints the gRPC port from its startup line; fails
# when it does not come up.
wait_for_server() {
  local log="$1" port=""
  for _ in $(seq 600); do
    port=$(grep -o 'event=startup .* port=[0-9]*' "$log" | grep -o 'port=[0-9]*$' | cut -d= -f2 || true)
    if grep -q 'event=serving' "$log" && [[ -n "$port" ]]; then
      echo "$port"
      return 0
    fi
    sleep 0.1
  done
  echo "the server did not come up; its log:" >&2
  cat "$log" >&2
  return 1
}
