#!/usr/bin/env bash
#
# Fetch the Code Llama weights with the signed link that Meta sends by e-mail.
#
# Interactive:      ./download.sh            (asks for the link, then for the models)
# Non-interactive:  PRESIGNED_URL='https://download.llamameta.net/*?Policy=...' \
#                   MODEL_SIZE=7b,13b-Instruct TARGET_FOLDER=/data/codellama ./download.sh
#                   (MODEL_SIZE set but empty means every model)
#
# Every file is resumed if a partial copy exists (or downloaded again from the start when the
# server cannot resume), checked for being an HTML page or empty, and the model files are
# compared with the md5 sums in each model's checklist.chk, which is downloaded anew on every
# run. Files that are not the model's own are never deleted or overwritten: a different
# LICENSE or USE_POLICY.md already in TARGET_FOLDER is kept and Meta's copy is saved beside
# it as LICENSE.codellama (the script stops if a different file of that name is there).
#
# Settings (environment variables):
#   PRESIGNED_URL   the link from the e-mail; asked for when unset or empty
#   MODEL_SIZE      comma-separated model names (exactly the names below, in any letter case);
#                   asked for when unset; empty = all models
#   TARGET_FOLDER   where the files go (default: the current directory)
#   DOWNLOADER      wget or curl (default: wget when installed, otherwise curl)
#   CHECKSUM_TOOL   md5sum, md5 (macOS) or openssl (default: the first one installed)
#   CODELLAMA_URL_PREFIX            accept links that start with this prefix instead of
#                                   Meta's download hosts (for mirrors and for tests)
#   CODELLAMA_EXPECTED_SHARD_BYTES  the shard size assumed by the free-space check
#                                   (default: an estimate per model size; 0 turns it off)
#
# Written for bash 3.2 (the macOS default) and newer: no associative arrays, no ${var,,}.

set -euo pipefail

ALL_MODELS="7b,13b,34b,70b,7b-Python,13b-Python,34b-Python,70b-Python,7b-Instruct,13b-Instruct,34b-Instruct,70b-Instruct"
META_HOST_PATTERN='^https://download[0-9]*\.llamameta\.net/'
META_HOST_TEXT="https://download.llamameta.net"
REQUEST_PAGE="https://www.llama.com/llama-downloads/"

TMP_LOG=""
PARTIAL=""  # a temporary download (fetch_anew) to remove if the script stops early
FAILED_FILES=()
FAILED_COUNT=0

# ----------------------------------------------------------------------------- messages

die() {
    # die LINE...: print every argument as one line of an error message and stop.
    local first=1 line
    for line in "$@"; do
        if [[ $first == 1 ]]; then
            printf 'ERROR: %s\n' "$line" >&2
            first=0
        else
            printf '       %s\n' "$line" >&2
        fi
    done
    exit 1
}

note() {
    printf '%s\n' "$*" >&2
}

cleanup() {
    if [[ -n $TMP_LOG ]]; then
        rm -f "$TMP_LOG"
    fi
    if [[ -n ${PARTIAL:-} ]]; then
        rm -f "$PARTIAL"
    fi
}

on_interrupt() {
    trap - INT TERM
    printf '\nInterrupted. Run the script again with the same link and models: finished files are\nkept and partial ones are resumed.\n' >&2
    exit 130
}

trap cleanup EXIT
trap on_interrupt INT TERM

# ----------------------------------------------------------------------------- small helpers

file_size() {
    # Size in bytes of a regular file (0 when it does not exist); wc -c works on Linux and macOS.
    if [[ -f $1 ]]; then
        wc -c <"$1" | tr -d ' \t'
    else
        echo 0
    fi
}

to_lower() {
    printf '%s' "$1" | tr '[:upper:]' '[:lower:]'
}

same_ignoring_case() {
    # same_ignoring_case A B: true when A and B are equal apart from letter case (no subprocess).
    local rc=1
    shopt -s nocasematch
    if [[ $1 == "$2" ]]; then
        rc=0
    fi
    shopt -u nocasematch
    return $rc
}

human_gb() {
    # 13400000000 -> 13.4 GB
    local bytes=$1
    printf '%d.%d GB' $((bytes / 1000000000)) $(((bytes % 1000000000) / 100000000))
}

free_bytes() {
    # Bytes available to us on the file system that holds directory $1, or nothing when df cannot tell.
    local kb
    kb=$(df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }') || return 0
    if [[ $kb =~ ^[0-9]+$ ]]; then
        echo $((kb * 1024))
    fi
}

# ----------------------------------------------------------------------------- tools

missing_downloader() {
    # missing_downloader WHAT: stop with install instructions for wget/curl.
    die "$1" \
        "Install one with 'sudo apt-get install wget' or 'sudo apt-get install curl' (Debian/Ubuntu)," \
        "'sudo dnf install wget' (Fedora/RHEL) or 'brew install wget' (macOS with Homebrew)." \
        "On Windows, run this script in WSL or Git Bash."
}

choose_downloader() {
    local wanted=${DOWNLOADER:-}
    case $wanted in
        wget | curl)
            command -v "$wanted" >/dev/null 2>&1 ||
                missing_downloader "DOWNLOADER=$wanted was requested but '$wanted' is not installed."
            DOWNLOADER=$wanted
            ;;
        "")
            if command -v wget >/dev/null 2>&1; then
                DOWNLOADER=wget
            elif command -v curl >/dev/null 2>&1; then
                DOWNLOADER=curl
            else
                missing_downloader "Neither wget nor curl is installed; one of them is needed to download the files."
            fi
            ;;
        *)
            die "DOWNLOADER must be 'wget' or 'curl', not '$wanted'."
            ;;
    esac
}

choose_checksum_tool() {
    local wanted=${CHECKSUM_TOOL:-} tool
    case $wanted in
        md5sum | md5 | openssl)
            command -v "$wanted" >/dev/null 2>&1 ||
                die "CHECKSUM_TOOL=$wanted was requested but '$wanted' is not installed."
            CHECKSUM_TOOL=$wanted
            ;;
        "")
            CHECKSUM_TOOL=""
            for tool in md5sum md5 openssl; do
                if command -v "$tool" >/dev/null 2>&1; then
                    CHECKSUM_TOOL=$tool
                    break
                fi
            done
            [[ -n $CHECKSUM_TOOL ]] ||
                die "No md5 tool found (md5sum, md5 or openssl); it is needed to verify the downloads." \
                    "Install md5sum with 'sudo apt-get install coreutils' (Debian/Ubuntu) or 'brew install coreutils'" \
                    "(macOS with Homebrew; macOS also ships 'md5' in /sbin, check that it is on your PATH)."
            ;;
        *)
            die "CHECKSUM_TOOL must be 'md5sum', 'md5' or 'openssl', not '$wanted'."
            ;;
    esac
}

md5_of() {
    # Print the md5 of file $1 (hex digits only).
    local out
    case $CHECKSUM_TOOL in
        md5sum) out=$(md5sum -- "$1") ;;
        md5) out=$(md5 -q "$1") ;;
        openssl) out=$(openssl md5 -r "$1") ;;
    esac
    out=${out%%[[:space:]]*}
    printf '%s' "${out#\\}"
}

# ----------------------------------------------------------------------------- the link

clean_url() {
    # Drop white space and quotes that come along when a link is pasted.
    local url=$1
    url=${url//[[:space:]]/}
    url=${url#\"}
    url=${url%\"}
    url=${url#\'}
    url=${url%\'}
    # Some mail clients hand out the '*' URL-encoded; put it back.
    if [[ $url != *"*"* && $url == *%2[Aa]* ]]; then
        local head=${url%%%2[Aa]*}
        url="$head*${url#"$head"%2?}"
    fi
    printf '%s' "$url"
}

check_url() {
    local url=$1 lower
    lower=$(to_lower "$url")
    [[ -n $url ]] || die "No download link was given." \
        "Paste the link from Meta's e-mail (it starts with $META_HOST_TEXT), or set PRESIGNED_URL."
    if [[ $lower == *l.facebook.com* || $lower == *facebook.com/l.php* ]]; then
        die "This is Facebook's link-tracking redirect (l.facebook.com), not the download link." \
            "It is what you get by right-clicking the link in the e-mail and choosing 'copy link'." \
            "Select and copy the text of the link itself instead: it starts with $META_HOST_TEXT/*?Policy=..."
    fi
    if [[ -n ${CODELLAMA_URL_PREFIX:-} ]]; then
        local prefix=${CODELLAMA_URL_PREFIX%/}
        note "Note: CODELLAMA_URL_PREFIX is set; accepting links that start with $prefix"
        if [[ $url != "$prefix"/* ]]; then
            die "The link must start with $prefix/ (set by CODELLAMA_URL_PREFIX), but it is:" "$url"
        fi
    elif ! [[ $lower =~ $META_HOST_PATTERN ]]; then
        die "The link must start with $META_HOST_TEXT (the text of the link in Meta's e-mail), but it is:" \
            "$url" \
            "Copy the link text from the e-mail again, the whole of it, and paste it here."
    fi
    if [[ $url != *"*"* ]]; then
        die "The link has no '*' in it, so it was not copied completely or was changed." \
            "The link from the e-mail looks like $META_HOST_TEXT/*?Policy=...&Signature=...&Key-Pair-Id=..." \
            "Copy the whole link text from the e-mail again."
    fi
    URL_HEAD=${url%%\**}
    URL_TAIL=${url#*\*}
}

# ----------------------------------------------------------------------------- the models

shard_count() {
    case $1 in
        7b*) echo 1 ;;
        13b*) echo 2 ;;
        34b*) echo 4 ;;
        70b*) echo 8 ;;
    esac
}

estimated_shard_bytes() {
    # Roughly the parameter count times two bytes (bfloat16), divided by the shards; a little low on purpose.
    # (main checks CODELLAMA_EXPECTED_SHARD_BYTES before anything is downloaded.)
    if [[ -n ${CODELLAMA_EXPECTED_SHARD_BYTES:-} ]]; then
        echo "$CODELLAMA_EXPECTED_SHARD_BYTES"
        return
    fi
    case $1 in
        7b*) echo 13400000000 ;;
        13b*) echo 13000000000 ;;
        34b*) echo 16800000000 ;;
        70b*) echo 17200000000 ;;
    esac
}

unknown_model() {
    printf '%s\n' "$1" >&2
    printf 'Valid models: %s\n' "$ALL_MODELS" >&2
    exit 1
}

canonical_model() {
    # canonical_model NAME: print the entry of ALL_MODELS that NAME spells, apart from letter case.
    local LC_ALL=C name=$1 known
    [[ $name =~ ^[A-Za-z0-9-]+$ ]] || return 1
    local IFS=,
    for known in $ALL_MODELS; do
        if same_ignoring_case "$name" "$known"; then
            printf '%s' "$known"
            return 0
        fi
    done
    return 1
}

parse_models() {
    # Fill MODELS with the canonical names from the comma-separated list $1 (blank = all). The list is
    # split with read, never by unquoted expansion: a '*' or '?' in it must not match file names.
    local list=$1 name found m
    local items=()
    [[ -n ${list//[[:space:]]/} ]] || list=$ALL_MODELS
    IFS=, read -r -d '' -a items <<<"$list" || true
    MODELS=()
    for name in ${items[@]+"${items[@]}"}; do
        name=${name#"${name%%[![:space:]]*}"}
        name=${name%"${name##*[![:space:]]}"}
        [[ -n $name ]] || continue
        found=$(canonical_model "$name") || unknown_model "Unknown model: $name"
        for m in ${MODELS[@]+"${MODELS[@]}"}; do
            if [[ $m == "$found" ]]; then
                found=""
                break
            fi
        done
        if [[ -n $found ]]; then
            MODELS+=("$found")
        fi
    done
    [[ ${#MODELS[@]} -gt 0 ]] || unknown_model "No model name in the list: $list"
}

# ----------------------------------------------------------------------------- downloading

looks_like_html() {
    # True when file $1 starts like a web page (<!DOCTYPE html, <html, or XHTML); bash only, no subprocess.
    local LC_ALL=C start="" rc=1
    IFS= read -r -d '' -n 512 start <"$1" || true
    start=${start//[[:space:]]/}
    shopt -s nocasematch
    if [[ $start == "<!doctypehtml"* || $start == "<html"* || $start == "<?xml"*"<html"* ]]; then
        rc=0
    fi
    shopt -u nocasematch
    return $rc
}

explain_http_error() {
    # explain_http_error CODE REL_PATH
    local code=$1 rel=$2
    case $code in
        403)
            die "The server refused $rel (HTTP 403 Forbidden)." \
                "The download link has most likely expired: links from Meta work for 24 hours and for" \
                "a limited number of downloads. Request a new link on Meta's Llama download page" \
                "($REQUEST_PAGE) and run this script again with it;" \
                "the files you already have are kept and partial ones are resumed." \
                "(A link copied incompletely, or a proxy that blocks the host, gives the same error.)"
            ;;
        404)
            die "The server has no $rel (HTTP 404 Not Found)." \
                "Either this model is not part of the link you were given, or the link was copied" \
                "incompletely or has expired (links work for 24 hours and a limited number of downloads)." \
                "Check the model names in the e-mail, or request a new link on Meta's Llama download" \
                "page ($REQUEST_PAGE) and run this script again."
            ;;
        *)
            die "The server answered HTTP $code for $rel." \
                "Run the script again later to resume; if it keeps failing, request a new link on" \
                "Meta's Llama download page ($REQUEST_PAGE)."
            ;;
    esac
}

explain_write_error() {
    # explain_write_error DEST
    local free shown=unknown
    free=$(free_bytes "${1%/*}")
    if [[ -n $free ]]; then
        shown=$(human_gb "$free")
    fi
    die "Could not write $1: the disk is probably full (or the folder is not writable)." \
        "Free space on that disk: $shown." \
        "Make room or choose another TARGET_FOLDER, then run the script again to resume."
}

check_free_space() {
    # check_free_space DEST EXPECTED_BYTES: stop before a shard download that cannot fit.
    local dest=$1 expected=$2 have need free
    [[ $expected -gt 0 ]] || return 0
    have=$(file_size "$dest")
    need=$((expected - have))
    [[ $need -gt 0 ]] || return 0
    free=$(free_bytes "${dest%/*}")
    [[ -n $free ]] || return 0
    if [[ $free -lt $need ]]; then
        die "Not enough free disk space for $dest." \
            "It needs about $(human_gb "$need") more, but only $(human_gb "$free") are free there." \
            "Make room or choose another TARGET_FOLDER, then run the script again to resume." \
            "(Set CODELLAMA_EXPECTED_SHARD_BYTES=0 to skip this check.)"
    fi
}

curl_fetch() {
    # curl_fetch URL DEST: download URL to DEST, resuming it; print the last HTTP status, return curl's.
    local progress=(--silent --show-error)
    if [[ -t 2 ]]; then
        progress=(--progress-bar)
    fi
    curl --fail --location --retry 3 "${progress[@]}" --continue-at - \
        --output "$2" --write-out '%{http_code}' "$1"
}

fetch() {
    # fetch REL_PATH DEST: download one file, resuming a partial copy; stop with an explanation on failure.
    local rel=$1 dest=$2 url rc code
    url="${URL_HEAD}${rel}${URL_TAIL}"
    refuse_folder "$dest"

    # A partial file that is an HTML page (for example from an earlier run of Meta's script) cannot be resumed.
    if [[ -s $dest ]] && looks_like_html "$dest"; then
        note "Removing $dest: it is an HTML page left from an earlier attempt, not the real file."
        rm -f "$dest"
    fi

    rc=0
    code=""
    if [[ $DOWNLOADER == curl ]]; then
        code=$(curl_fetch "$url" "$dest") || rc=$?
        if [[ $rc == 33 ]]; then
            # The server ignored the range request: this copy can never be resumed, so start over
            # (wget does that by itself).
            note "The server cannot resume $rel; downloading it again from the start."
            rm -f "$dest"
            rc=0
            code=$(curl_fetch "$url" "$dest") || rc=$?
        fi
        [[ $rc != 23 ]] || explain_write_error "$dest"
    else
        local wget_progress=--progress=dot:giga
        if [[ -t 2 ]]; then
            wget_progress=--progress=bar:force
        fi
        TMP_LOG=${TMP_LOG:-$(mktemp "${TMPDIR:-/tmp}/codellama-download.XXXXXX")}
        LC_ALL=C wget --continue "$wget_progress" -O "$dest" "$url" 2>&1 | tee "$TMP_LOG" >&2 || rc=${PIPESTATUS[0]}
        # wget reports "HTTP request sent, awaiting response... 403 Forbidden"; keep the last such code.
        code=$(awk '/awaiting response\.\.\. [0-9][0-9][0-9]/ {
                        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9][0-9][0-9]$/) c = $i
                    } END { print c }' "$TMP_LOG")
        [[ $rc != 3 ]] || explain_write_error "$dest"
    fi

    # 416 on a resumed request: the local copy already has every byte (curl --fail calls that an error).
    if [[ $rc != 0 && $code == 416 && -s $dest ]]; then
        rc=0
    fi
    if [[ $rc != 0 ]]; then
        # Do not leave an empty file behind (wget creates the output file before it knows the answer).
        if [[ -f $dest && ! -s $dest ]]; then
            rm -f "$dest"
        fi
        if [[ $code =~ ^[45][0-9][0-9]$ && $code != 416 ]]; then
            explain_http_error "$code" "$rel"
        fi
        local free
        free=$(free_bytes "${dest%/*}")
        if [[ -n $free && $free -lt 1000000 ]]; then
            explain_write_error "$dest"
        fi
        die "Downloading $rel failed ($DOWNLOADER exit status $rc${code:+, last HTTP status $code})." \
            "Check your network connection and proxy settings, then run the script again to resume."
    fi

    if [[ ! -s $dest ]]; then
        rm -f "$dest"
        die "The server sent an empty file for $rel." \
            "This usually means the link is wrong or has expired. Request a new link on Meta's Llama" \
            "download page ($REQUEST_PAGE) and run this script again."
    fi
    if looks_like_html "$dest"; then
        rm -f "$dest"
        die "The server sent a web page (HTML) instead of $rel; the page was deleted." \
            "This usually means the link is wrong or has expired, so a sign-in or error page came back." \
            "Copy the link text (starting with $META_HOST_TEXT) from the e-mail," \
            "or request a new link on Meta's Llama download page ($REQUEST_PAGE)," \
            "and run this script again."
    fi
}

refuse_folder() {
    # refuse_folder PATH: stop when PATH is a folder, where a download would go into, not in its place.
    if [[ -d $1 ]]; then
        die "$1 is a folder, but the script downloads a file of that name." \
            "Move the folder away, then run the script again."
    fi
}

new_temp_file() {
    # new_temp_file DEST: create an empty, unused file beside DEST and print its name. Not mktemp: its
    # files are private (mode 0600), and the download should get the usual permissions (the umask's).
    local name tries=0
    while [[ $tries -lt 100 ]]; do
        name="${1%/*}/.${1##*/}.download-$$-$RANDOM"
        if (set -C && : >"$name") 2>/dev/null; then
            printf '%s' "$name"
            return 0
        fi
        tries=$((tries + 1))
    done
    die "Could not create a temporary file in ${1%/*}; check that the folder is writable."
}

fetch_anew() {
    # fetch_anew REL_PATH DEST: download REL_PATH whole into a new temporary file beside DEST, left in
    # PARTIAL (removed on exit unless moved): a local file named DEST is never resumed or replaced here.
    refuse_folder "$2"
    PARTIAL=$(new_temp_file "$2")
    fetch "$1" "$PARTIAL"
}

fetch_fresh() {
    # fetch_fresh REL_PATH DEST: replace DEST with the server's current copy. For checklist.chk: a
    # complete but stale copy would otherwise be kept forever (resuming it gets "nothing left"), and
    # every shard would be compared with the wrong sums on every run.
    fetch_anew "$1" "$2"
    mv -f "$PARTIAL" "$2"
    PARTIAL=""
}

fetch_whole() {
    # fetch_whole REL_PATH DEST: for a file that has no checksum (LICENSE, USE_POLICY.md) and may share
    # its name with a user's file (a source checkout's own LICENSE when the target is the checkout).
    # DEST is replaced only when it is a first part of the download (an earlier, cut-off run); otherwise
    # it is kept and the download goes to DEST.codellama, unless a different file has that name.
    local rel=$1 dest=$2 beside=$2.codellama
    fetch_anew "$rel" "$dest"
    if [[ ! -f $dest ]] || cmp -s -n "$(file_size "$dest")" "$dest" "$PARTIAL"; then
        mv -f "$PARTIAL" "$dest"
    elif [[ ! -e $beside && ! -L $beside ]]; then
        mv -f "$PARTIAL" "$beside"
        note "Kept the existing $dest (its content differs); Meta's $rel is saved as $beside."
    elif [[ -f $beside ]] && cmp -s "$beside" "$PARTIAL"; then
        rm -f "$PARTIAL"
        note "Kept the existing $dest (its content differs); Meta's $rel is in $beside."
    else
        die "$beside already exists and is not Meta's $rel; it is kept." \
            "$dest differs from Meta's $rel too, so there is no place left to save Meta's copy." \
            "Move one of them away, then run the script again."
    fi
    PARTIAL=""
}

# ----------------------------------------------------------------------------- verification

record_failure() {
    FAILED_FILES+=("$1")
    FAILED_COUNT=$((FAILED_COUNT + 1))
}

verify_model() {
    # verify_model DIR FILE...: compare FILEs in DIR with DIR/checklist.chk; record failures in FAILED_FILES.
    local dir=$1 line name sum i found actual
    shift
    local names=() sums=() count=0
    local line_pattern='^([0-9a-fA-F]{32})[[:space:]]+\*?(.*[^[:space:]])[[:space:]]*$'
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ -n ${line//[[:space:]]/} ]] || continue
        if [[ $line =~ $line_pattern ]]; then
            sums+=("${BASH_REMATCH[1]}")
            name=${BASH_REMATCH[2]}
            names+=("${name#./}")
            count=$((count + 1))
        else
            printf '%s\n' "$dir/checklist.chk: FAILED (not a checksum line: $line)"
            record_failure "$dir/checklist.chk (a line is not an md5 sum and a file name)"
            return 0
        fi
    done <"$dir/checklist.chk"

    for name in "$@"; do
        found=""
        for ((i = 0; i < count; i++)); do
            if [[ ${names[$i]} == "$name" ]]; then
                found=${sums[$i]}
                break
            fi
        done
        if [[ -z $found ]]; then
            printf '%s: FAILED (not listed in checklist.chk, cannot be verified)\n' "$name"
            record_failure "$dir/$name (not listed in checklist.chk)"
            continue
        fi
        actual=$(md5_of "$dir/$name")
        if same_ignoring_case "$actual" "$found"; then
            printf '%s: OK\n' "$name"
        else
            printf '%s: FAILED (md5 %s, expected %s)\n' "$name" "$actual" "$found"
            record_failure "$dir/$name"
        fi
    done

    for name in ${names[@]+"${names[@]}"}; do
        found=""
        for sum in "$@"; do
            if [[ $sum == "$name" ]]; then
                found=1
                break
            fi
        done
        [[ -n $found ]] || note "Warning: checklist.chk lists $name, which this script does not download."
    done
}

# ----------------------------------------------------------------------------- main

main() {
    local target=${TARGET_FOLDER:-.} url models m shards s i files folder

    if [[ -n ${CODELLAMA_EXPECTED_SHARD_BYTES:-} && ! $CODELLAMA_EXPECTED_SHARD_BYTES =~ ^[0-9]+$ ]]; then
        die "CODELLAMA_EXPECTED_SHARD_BYTES must be a number of bytes, not '$CODELLAMA_EXPECTED_SHARD_BYTES'."
    fi
    choose_downloader
    choose_checksum_tool

    if [[ -n ${PRESIGNED_URL:-} ]]; then
        url=$PRESIGNED_URL
    else
        url=""
        if ! IFS= read -r -p "Enter the URL from email: " url && [[ -z $url ]]; then
            echo >&2
            die "No download link was given (input ended)." \
                "Run the script in a terminal, or set PRESIGNED_URL for unattended use."
        fi
        echo ""
    fi
    url=$(clean_url "$url")
    check_url "$url"

    if [[ -n ${MODEL_SIZE+set} ]]; then
        models=$MODEL_SIZE
    else
        models=""
        if ! IFS= read -r -p "Enter the list of models to download without spaces ($ALL_MODELS), or press Enter for all: " models && [[ -z $models ]]; then
            echo >&2
            die "No model list was given (input ended)." \
                "Run the script in a terminal, or set MODEL_SIZE (empty for all models) for unattended use."
        fi
    fi
    parse_models "$models"
    # A name starting with '-' would be read as an option by mkdir, rm, cmp, md5 and the others.
    [[ $target != -* ]] || target=./$target

    mkdir -p "$target" || die "Could not create the folder $target."
    [[ -w $target ]] || die "The folder $target is not writable."

    echo "Using $DOWNLOADER to download and $CHECKSUM_TOOL to verify; files go to $target"
    echo "Downloading LICENSE and Acceptable Usage Policy"
    fetch_whole "LICENSE" "$target/LICENSE"
    fetch_whole "USE_POLICY.md" "$target/USE_POLICY.md"

    for m in "${MODELS[@]}"; do
        folder="CodeLlama-$m"
        echo "Downloading $folder"
        mkdir -p "$target/$folder" || die "Could not create the folder $target/$folder."
        shards=$(shard_count "$m")
        # The small files first: a bad link or a model missing from it shows up before the big shards.
        for s in params.json tokenizer.model; do
            fetch "$folder/$s" "$target/$folder/$s"
        done
        fetch_fresh "$folder/checklist.chk" "$target/$folder/checklist.chk"
        files=()
        for ((i = 0; i < shards; i++)); do
            s=$(printf 'consolidated.%02d.pth' "$i")
            check_free_space "$target/$folder/$s" "$(estimated_shard_bytes "$m")"
            fetch "$folder/$s" "$target/$folder/$s"
            files+=("$s")
        done
        echo "Checking checksums"
        verify_model "$target/$folder" "${files[@]}" params.json tokenizer.model
    done

    if [[ $FAILED_COUNT -gt 0 ]]; then
        {
            echo "ERROR: checksum verification failed for $FAILED_COUNT file(s):"
            for s in "${FAILED_FILES[@]}"; do
                echo "         $s"
            done
            echo "       These files are damaged or incomplete. Delete them and run the script again"
            echo "       (request a new link first if this one has expired)."
        } >&2
        exit 1
    fi
    echo "All files downloaded and verified in $target"
}

main
