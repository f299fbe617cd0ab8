/* The single file's launcher (see docs/packaging.md for the layout).
 *
 * The file is this program, then an archive of the PyInstaller one-folder build, then (unless
 * built with --external-model) the GGUF, then a fixed-size trailer. At every start we read the
 * trailer from the end of our own file (one read, whatever the size of the weights), look for the
 * program already unpacked in the cache folder under the archive's content hash, unpack it once if
 * it is missing (into a temporary folder renamed when complete and checked against that hash, so
 * neither a killed unpacking nor a damaged file is ever used), and run it with GEMMA_CHAT_BUNDLE
 * naming this file, holding a lock that tells newer builds the folder is in use. The Python side
 * has llama.cpp map the GGUF from this file.
 *
 * Archive entries, little-endian: u8 kind ('d' folder, 'f' file, 'l' symbolic link), u32 mode,
 * u32 name length, u64 data length, the name (UTF-8, '/'-separated, relative), the data (a
 * file's bytes or a link's target). Trailer: u64 app offset, u64 app size, u64 model offset,
 * u64 model size, u64 flags, 32 bytes app id, 64 bytes model SHA-256, 256 bytes model name,
 * 8 bytes magic. gemmachat/bundle.py writes and reads the same layout.
 */
#define _FILE_OFFSET_BITS 64
#define _GNU_SOURCE /* sync_file_range */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sha256.h"

#ifdef _WIN32
#include <windows.h>
#include <io.h>
#define SEP "\\"
#define PROGRAM_NAME "gemma-chat.exe"
#else
#include <fcntl.h>
#include <ftw.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __APPLE__
#include <mach-o/dyld.h>
#endif
#define SEP "/"
#define PROGRAM_NAME "gemma-chat"
#endif

#define TRAILER_SIZE 400
#define MAGIC "GEMMAPK1"
#define PATH_SIZE 4096
#define NAME_SIZE 1024
#define CACHE_HINT "set GEMMA_CHAT_CACHE_DIR to another folder"

static char self_path[PATH_SIZE];
static char unpacking[PATH_SIZE]; /* the folder this start is unpacking into, while it does */

static void remove_tree(const char *path);

static void fail(const char *what, const char *path, const char *hint) {
    fprintf(stderr, "gemma-chat: %s %s: %s%s%s%s\n", what, path, strerror(errno),
            hint ? " (" : "", hint ? hint : "", hint ? ")" : "");
    /* A full disk stayed full of it, and every retry added another. */
    if (unpacking[0]) remove_tree(unpacking);
    exit(2);
}

static uint64_t le64(const unsigned char *p) {
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--) value = (value << 8) | p[i];
    return value;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- what differs between operating systems ---------------------------------------------- */

#ifdef _WIN32
static wchar_t *wide(const char *utf8) {
    static wchar_t buffers[2][PATH_SIZE];
    static int next;
    wchar_t *out = buffers[next++ % 2];
    if (!MultiByteToWideChar(CP_UTF8, 0, utf8, -1, out, PATH_SIZE)) out[0] = 0;
    for (wchar_t *c = out; *c; c++) if (*c == L'/') *c = L'\\';
    return out;
}

static int find_self(void) {
    wchar_t path[PATH_SIZE];
    DWORD n = GetModuleFileNameW(NULL, path, PATH_SIZE);
    return n > 0 && n < PATH_SIZE &&
           WideCharToMultiByte(CP_UTF8, 0, path, -1, self_path, PATH_SIZE, NULL, NULL) > 0;
}

static const char *env(const char *name) {
    static char value[PATH_SIZE];
    wchar_t wvalue[PATH_SIZE];
    DWORD n = GetEnvironmentVariableW(wide(name), wvalue, PATH_SIZE);
    if (n == 0 || n >= PATH_SIZE) return NULL;
    WideCharToMultiByte(CP_UTF8, 0, wvalue, -1, value, PATH_SIZE, NULL, NULL);
    return value;
}

/* platformdirs' user_cache_dir("gemma-chat") on Windows. */
static int default_cache(char *out) {
    const char *local = env("LOCALAPPDATA");
    return local && snprintf(out, PATH_SIZE, "%s\\gemma-chat\\gemma-chat\\Cache", local) < PATH_SIZE;
}

static FILE *open_file(const char *path, const char *mode) {
    return _wfopen(wide(path), mode[0] == 'r' ? L"rb" : L"wb");
}

static int seek(FILE *f, uint64_t offset) { return _fseeki64(f, (long long)offset, SEEK_SET); }

static int seek_end(FILE *f, long back) { return _fseeki64(f, -(long long)back, SEEK_END); }

static int make_dir(const char *path) {
    if (CreateDirectoryW(wide(path), NULL) || GetLastError() == ERROR_ALREADY_EXISTS) return 0;
    errno = EACCES;
    return -1;
}

static int is_file(const char *path) {
    DWORD attributes = GetFileAttributesW(wide(path));
    return attributes != INVALID_FILE_ATTRIBUTES && !(attributes & FILE_ATTRIBUTE_DIRECTORY);
}

static int make_link(const char *target, const char *path) {
    (void)target; (void)path;
    errno = ENOSYS;  /* PyInstaller makes no symbolic links in a Windows build */
    return -1;
}

static int set_mode(FILE *f, uint32_t mode) { (void)f; (void)mode; return 0; }

static void remember_written(const char *path) { (void)path; }

static void flush_written(void) {}

static int rename_dir(const char *from, const char *to) {
    if (MoveFileExW(wide(from), wide(to), 0)) return 0;
    errno = EEXIST;
    return -1;
}

static void set_bundle_variable(void) {
    SetEnvironmentVariableW(L"GEMMA_CHAT_BUNDLE", wide(self_path));
}

static long process_id(void) { return (long)GetCurrentProcessId(); }

/* Left to the next start's cleaner, which removes what no running start owns. */
static void remove_tree(const char *path) { (void)path; }

/* Windows will not rename a folder whose program runs, which is what a cleaner tries first. */
static void hold_lock(const char *folder) { (void)folder; }

static int attended(void) { return _isatty(2); }

/* Windows has no exec: run the program with our command line and hand back its exit status.
 * Ctrl-C reaches the child through the shared console; the launcher only waits. */
static int run_program(const char *program, char **argv) {
    (void)argv;
    STARTUPINFOW startup;
    PROCESS_INFORMATION process;
    DWORD status = 2;
    memset(&startup, 0, sizeof startup);
    startup.cb = sizeof startup;
    SetConsoleCtrlHandler(NULL, TRUE);
    /* CreateProcessW may write into the command line it is given: hand it a copy. */
    if (!CreateProcessW(wide(program), _wcsdup(GetCommandLineW()), NULL, NULL, TRUE, 0, NULL, NULL,
                        &startup, &process)) {
        errno = EACCES;
        fail("cannot run", program, CACHE_HINT);
    }
    WaitForSingleObject(process.hProcess, INFINITE);
    GetExitCodeProcess(process.hProcess, &status);
    return (int)status;
}
#else
static int find_self(void) {
#ifdef __APPLE__
    char path[PATH_SIZE];
    uint32_t size = sizeof path;
    return _NSGetExecutablePath(path, &size) == 0 && realpath(path, self_path) != NULL;
#else
    ssize_t n = readlink("/proc/self/exe", self_path, PATH_SIZE - 1);
    if (n <= 0) return 0;
    self_path[n] = 0;
    return 1;
#endif
}

static const char *env(const char *name) { return getenv(name); }

/* platformdirs' user_cache_dir("gemma-chat"): ~/Library/Caches on macOS, $XDG_CACHE_HOME or
 * ~/.cache elsewhere. */
static int default_cache(char *out) {
    const char *home = getenv("HOME");
    if (!home || !*home) {
        struct passwd *user = getpwuid(getuid());
        home = user ? user->pw_dir : NULL;
    }
#ifdef __APPLE__
    return home && snprintf(out, PATH_SIZE, "%s/Library/Caches/gemma-chat", home) < PATH_SIZE;
#else
    const char *xdg = getenv("XDG_CACHE_HOME");
    if (xdg && xdg[0] == '/') return snprintf(out, PATH_SIZE, "%s/gemma-chat", xdg) < PATH_SIZE;
    return home && snprintf(out, PATH_SIZE, "%s/.cache/gemma-chat", home) < PATH_SIZE;
#endif
}

static FILE *open_file(const char *path, const char *mode) {
    return fopen(path, mode[0] == 'r' ? "rb" : "wb");
}

static int seek(FILE *f, uint64_t offset) { return fseeko(f, (off_t)offset, SEEK_SET); }

static int seek_end(FILE *f, long back) { return fseeko(f, -(off_t)back, SEEK_END); }

static int make_dir(const char *path) {
    return mkdir(path, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static int is_file(const char *path) {
    struct stat info;
    return stat(path, &info) == 0 && S_ISREG(info.st_mode);
}

static int make_link(const char *target, const char *path) { return symlink(target, path); }

static int remove_entry(const char *path, const struct stat *info, int kind, struct FTW *walk) {
    (void)info; (void)kind; (void)walk;
    return remove(path);
}

static void remove_tree(const char *path) { nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* Every unpacked file is on disk before the folder is renamed (flush_written), so a crash cannot
 * leave a complete-looking folder with empty files in it. Linux starts each file's writeback as
 * soon as it is written and the waiting comes once at the end: about 0.08 s less on the first
 * start than waiting for each file in turn (99 MB in 158 files here). */
static int set_mode(FILE *f, uint32_t mode) {
    if (fflush(f) != 0 || fchmod(fileno(f), mode & 0777) != 0) return -1;
#ifdef __linux__
    sync_file_range(fileno(f), 0, 0, SYNC_FILE_RANGE_WRITE);
#endif
    return 0;
}

static char **written;
static size_t written_count, written_room;

static void remember_written(const char *path) {
    if (written_count == written_room) {
        written_room = written_room ? 2 * written_room : 256;
        written = realloc(written, written_room * sizeof *written);
    }
    if (!written || !(written[written_count++] = strdup(path))) {
        errno = ENOMEM;
        fail("cannot unpack", path, NULL);
    }
}

static void flush_written(void) {
    for (size_t i = 0; i < written_count; i++) {
        int fd = open(written[i], O_RDONLY);
        if (fd < 0 || fsync(fd) != 0) fail("cannot write", written[i], CACHE_HINT);
        close(fd);
        free(written[i]);
    }
    written_count = 0;
}

static int rename_dir(const char *from, const char *to) { return rename(from, to); }

static void set_bundle_variable(void) { setenv("GEMMA_CHAT_BUNDLE", self_path, 1); }

static long process_id(void) { return (long)getpid(); }

/* A shared lock on <folder>.lock for as long as the program runs: the descriptor is not
 * close-on-exec, so the program inherits it. A newer build removes an older build's folder only
 * when it can take this lock exclusively (gemmachat/cache.py). A cleaner unlinks the lock file
 * while holding it, so a lock taken on an unlinked file is taken again. Without a lock (a
 * read-only cache) the program still runs. */
static void hold_lock(const char *folder) {
    char lock[PATH_SIZE];
    if (snprintf(lock, PATH_SIZE, "%s.lock", folder) >= PATH_SIZE) return;
    for (;;) {
        struct stat held, named;
        int fd = open(lock, O_RDWR | O_CREAT, 0644);
        if (fd < 0) return;
        if (flock(fd, LOCK_SH) != 0) {
            close(fd);
            return;
        }
        if (fstat(fd, &held) == 0 && stat(lock, &named) == 0 && held.st_ino == named.st_ino &&
            held.st_dev == named.st_dev)
            return;
        close(fd);
    }
}

static int attended(void) { return isatty(2); }

static int run_program(const char *program, char **argv) {
    execv(program, argv);
    fail("cannot run", program, "set GEMMA_CHAT_CACHE_DIR to a folder where programs may run");
    return 2;
}
#endif

/* ---- the same everywhere ------------------------------------------------------------------ */

static void make_dirs(char *path) {
    /* every parent first; the drive or root itself is never created */
    for (char *c = path + 1; *c; c++) {
        if (*c != '/' && *c != '\\') continue;
        char saved = *c;
        *c = 0;
        if (c[-1] != ':' && make_dir(path) != 0) fail("cannot write the cache folder", path, CACHE_HINT);
        *c = saved;
    }
    if (make_dir(path) != 0) fail("cannot write the cache folder", path, CACHE_HINT);
}

static void read_exact(FILE *f, void *buffer, size_t size) {
    if (fread(buffer, 1, size, f) != size) {
        errno = EIO;
        fail("cannot read", self_path, "the file is truncated: download it again");
    }
}

static void corrupt(void) {
    errno = EINVAL;
    fail("cannot read", self_path, "the file is corrupt: download it again");
}

/* Every byte of the archive goes through here, into the hash that must give the app id. */
static void read_archive(FILE *f, void *buffer, size_t size, sha256 *hash) {
    read_exact(f, buffer, size);
    sha256_update(hash, buffer, size);
}

static void unpack(FILE *self, uint64_t offset, uint64_t size, const char *folder, const char *id) {
    static char buffer[1 << 20];
    char name[NAME_SIZE], path[PATH_SIZE], digest[65];
    uint64_t end = offset + size;
    sha256 hash;
    sha256_init(&hash);
    if (seek(self, offset) != 0) fail("cannot read", self_path, NULL);
    while (offset < end) {
        unsigned char header[17];
        read_archive(self, header, sizeof header, &hash);
        char kind = (char)header[0];
        uint32_t mode = le32(header + 1), name_length = le32(header + 5);
        uint64_t data_length = le64(header + 9);
        if (name_length >= NAME_SIZE) corrupt();
        read_archive(self, name, name_length, &hash);
        name[name_length] = 0;
        if (snprintf(path, PATH_SIZE, "%s" SEP "%s", folder, name) >= PATH_SIZE) {
            errno = ENAMETOOLONG;
            fail("cannot write", folder, CACHE_HINT);
        }
        if (kind == 'd') {
            if (make_dir(path) != 0) fail("cannot write", path, CACHE_HINT);
        } else if (kind == 'l') {
            char target[NAME_SIZE];
            if (data_length >= NAME_SIZE) corrupt();
            read_archive(self, target, (size_t)data_length, &hash);
            target[data_length] = 0;
            if (make_link(target, path) != 0) fail("cannot write", path, CACHE_HINT);
        } else {
            FILE *out = open_file(path, "w");
            if (!out) fail("cannot write", path, CACHE_HINT);
            for (uint64_t left = data_length; left > 0;) {
                size_t n = left < sizeof buffer ? (size_t)left : sizeof buffer;
                read_archive(self, buffer, n, &hash);
                if (fwrite(buffer, 1, n, out) != n) fail("cannot write", path, CACHE_HINT);
                left -= n;
            }
            if (set_mode(out, mode) != 0 || fclose(out) != 0) fail("cannot write", path, CACHE_HINT);
            remember_written(path);
        }
        offset += sizeof header + name_length + data_length;
    }
    /* A download damaged in the middle still ends in a good trailer, whose id names the good
     * program: unpacked unchecked, it crashed at every start, a good copy's too. */
    sha256_hex(&hash, digest);
    if (memcmp(digest, id, 32) != 0) corrupt();
}

int main(int argc, char **argv) {
    (void)argc;
    unsigned char trailer[TRAILER_SIZE];
    char cache[PATH_SIZE], folder[PATH_SIZE], program[PATH_SIZE], partial[PATH_SIZE], id[33];

    if (!find_self()) {
        fprintf(stderr, "gemma-chat: cannot find the path of this program\n");
        return 2;
    }
    FILE *self = open_file(self_path, "r");
    if (!self) fail("cannot read", self_path, NULL);
    if (seek_end(self, TRAILER_SIZE) != 0 ||
        fread(trailer, 1, TRAILER_SIZE, self) != TRAILER_SIZE ||
        memcmp(trailer + TRAILER_SIZE - 8, MAGIC, 8) != 0) {
        fprintf(stderr, "gemma-chat: %s carries no program: it is truncated or was not made by "
                        "packaging/build.py\n", self_path);
        return 2;
    }
    memcpy(id, trailer + 40, 32);
    id[32] = 0;

    const char *override = env("GEMMA_CHAT_CACHE_DIR");
    if (override && *override) {
        if (snprintf(cache, PATH_SIZE, "%s", override) >= PATH_SIZE) {
            errno = ENAMETOOLONG;
            fail("cannot use the cache folder", override, CACHE_HINT);
        }
    } else if (!default_cache(cache)) {
        fprintf(stderr, "gemma-chat: cannot find the user cache folder (" CACHE_HINT ")\n");
        return 2;
    }
    if (snprintf(folder, PATH_SIZE, "%s" SEP "app" SEP "%s", cache, id) >= PATH_SIZE ||
        snprintf(program, PATH_SIZE, "%s" SEP PROGRAM_NAME, folder) >= PATH_SIZE) {
        errno = ENAMETOOLONG;
        fail("cannot use the cache folder", cache, CACHE_HINT);
    }

    if (snprintf(partial, PATH_SIZE, "%s" SEP "app", cache) >= PATH_SIZE) {
        errno = ENAMETOOLONG;
        fail("cannot use the cache folder", cache, CACHE_HINT);
    }
    if (!is_file(program)) make_dirs(partial);
    hold_lock(folder);
    if (!is_file(program)) {
        if (snprintf(partial, PATH_SIZE, "%s.partial-%ld-%ld", folder, process_id(), (long)time(NULL)) >= PATH_SIZE ||
            make_dir(partial) != 0)
            fail("cannot write the cache folder", partial, CACHE_HINT);
        if (attended()) fprintf(stderr, "gemma-chat: unpacking the program into %s (first start only)\n", folder);
        strcpy(unpacking, partial);
        unpack(self, le64(trailer), le64(trailer + 8), partial, id);
        flush_written();
        /* Another start may have finished first; then its folder is as good as ours, and ours
         * goes (it stayed, 100 MB, as long as this start ran). A folder there without the program
         * was damaged by hand: set it aside and put ours in place. */
        if (rename_dir(partial, folder) != 0) {
            if (is_file(program)) {
                remove_tree(partial);
            } else {
                char aside[PATH_SIZE];
                if (snprintf(aside, PATH_SIZE, "%s.damaged-%ld-%ld", folder, process_id(), (long)time(NULL)) >= PATH_SIZE ||
                    rename_dir(folder, aside) != 0 || rename_dir(partial, folder) != 0)
                    fail("cannot write the cache folder", folder, CACHE_HINT);
            }
        }
        unpacking[0] = 0;
    }
    fclose(self);
    set_bundle_variable();
    return run_program(program, argv);
}
