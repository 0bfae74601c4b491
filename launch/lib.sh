# Helpers shared by the launch scripts (sourced, not run). Needs bash 3.2 or later.

# Print one argument as the shell would read it back (single quotes only where needed).
q() {
  case "$1" in
    '' | *[!A-Za-z0-9_./:=@%+,-]*)
      printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# The script's header comment, as its --help text.
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
