/*
 * containerizer-supervisor: reaps one container's workload and records how it ended.
 *
 * The Python service must be able to die and restart while containers keep running, and a Python
 * process per container costs far more than the 3 MiB RSS budget. So each container gets this
 * small program: it forks the workload (pid 1 of a new pid namespace unless --no-namespaces),
 * confines it, tells the service over its stdout whether the exec succeeded, waits for the
 * workload, and writes the exit status atomically to --status-file, where a restarted service
 * finds it.
 *
 * Usage:
 *   containerizer-supervisor --config-fd FD
 *
 * The configuration comes through FD (the service passes 0, a pipe it writes and closes), never
 * through argv: the workload's argv and environment hold secrets, and /proc/PID/cmdline is
 * readable by every local user. It is a sequence of NUL-terminated strings, at most
 * CONFIG_MAX_BYTES in all, read to EOF:
 *
 *   --status-file F --sandbox DIR [--cgroup-procs P]... [--cwd DIR] [--user NAME|UID]
 *   [--hostname NAME] [--env K=V]... [--no-namespaces] [--netns PATH]
 *   [--rootfs-lower DIR --rootfs-dir DIR] [--bind SRC --to DST [--read-only]]...
 *   (--privileged | --capabilities MASK --seccomp LEN <LEN bytes>) [--no-new-privs]
 *   [--masked-path P]... [--readonly-path P]... [--cgroupns]
 *   -- argv...
 *
 * --seccomp LEN is followed by LEN raw bytes (not NUL-terminated): a BPF program, an array of
 * struct sock_filter, compiled by the service (adapter/seccomp.py).
 *
 * --sandbox DIR: the workload's stdout and stderr are DIR/stdout and DIR/stderr, appended to.
 * DIR is opened with O_NOFOLLOW and the files relative to it with O_NOFOLLOW, so a workload
 * that replaced them with symlinks cannot make a later launch write elsewhere; a file that is
 * not regular or has other links is refused. Once the workload's user is known, DIR (0750) and
 * both files (0640) are given to it: what it writes is its own, and other host users read none.
 *
 * --netns PATH: the child joins the network namespace bound at PATH (setns(CLONE_NEWNET), e.g.
 * /run/netns/NAME prepared by the network isolator) after joining its cgroups and before the
 * other unshares, so the workload's first instruction already runs on the container's network.
 *
 * --rootfs-lower DIR --rootfs-dir DIR: the workload's / is an overlay of the read-only image
 * rootfs DIR (lower) with DIR/upper and DIR/work, mounted at DIR/merged inside the container's
 * own mount namespace (so the mount dies with the container; nothing on the host to leak), with
 * a fresh /proc, a minimal /dev (null zero full random urandom tty, a private devpts and shm),
 * /sys (read-only unless --privileged) and each --bind SRC --to DST (host path onto a path
 * inside the rootfs; --read-only after one makes it read-only), then pivot_root (Mesos'
 * filesystem/linux isolator). With --cgroupns the child also gets a cgroup namespace (after it
 * joined its cgroups, so they are its root) and /sys/fs/cgroup is a read-only tmpfs holding
 * each of the host's cgroup hierarchies mounted read-only from inside that namespace.
 *
 * Confinement, unless --privileged (the kernel's capability rules are what make this work):
 *   - the bounding set is cut to MASK in the container's init (so it holds nothing the workload
 *     could borrow) and the workload, and ambient capabilities are cleared;
 *   - --masked-path P: a file gets /dev/null bound over it, a directory an empty read-only
 *     tmpfs; --readonly-path P is bound onto itself read-only (nosuid, nodev, noexec); paths that
 *     do not exist are skipped;
 *   - as root the workload keeps MASK as its effective, permitted and inheritable sets; as any
 *     other user setuid() clears them all;
 *   - no_new_privs for any user but root (and for root with --no-new-privs), so a setuid binary
 *     gives nothing back;
 *   - the seccomp filter, loaded last. Without no_new_privs the kernel lets only a holder of
 *     CAP_SYS_ADMIN load a filter, so root keeps it until the filter is in and then drops to
 *     MASK with capset (which the filter allows) right before execve.
 *
 * Handshake (one line on stdout, then stdout is /dev/null):
 *   ok <child_host_pid> <child_start_time> <supervisor_start_time>
 * (the child is the container's init with namespaces, the workload itself without)
 *   error <step>: <reason>                       (exit status 1 or 2; no status file is written)
 * Steps a user's request causes: exec (missing or unusable binary), user (unknown user), cwd
 * (missing working directory), sandbox, stdout, stderr. `args` is a configuration the service
 * should never have sent, or one larger than CONFIG_MAX_BYTES.
 * Start times are field 22 of /proc/PID/stat. The supervisor reports them itself because it is the
 * only process that can read them without a race: the workload stays at least a zombie until the
 * supervisor reaps it, and the supervisor may be gone before the service gets to look.
 *
 * Status file:
 *   exited <code> | signaled <signo>
 *   finished <unix time, seconds.milliseconds>
 *
 * Signals: SIGTERM, SIGINT, SIGHUP and friends are ignored so that only SIGKILL ends the
 * supervisor; signals meant for the container go from the service to the container's init.
 * With namespaces, pid 1 of the new pid namespace is a tiny init of ours (the forked child), not
 * the workload: the kernel delivers to a namespace's pid 1 only the signals it handles, so a
 * plain workload as pid 1 would ignore SIGTERM and never reap orphans. The init forwards the
 * usual termination signals to the workload (pid 2), reaps every orphan, and when the workload
 * ends passes its wait status to the supervisor over a pipe and exits; the kernel then kills
 * every other process of the namespace. A SIGKILL to the init ends the whole container.
 *
 * Exit status: 0 status recorded; 1 the workload could not be started (error line written);
 * 2 bad configuration or a failure before the fork (error line written); 3 waitpid failed;
 * 4 the status file could not be written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HOSTNAME_MAX_LEN 63
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CONFIG_MAX_BYTES (16u << 20) /* far above what execve accepts as argv + environment */
#define CONFIG_CHUNK (64u << 10)
#define CGROUP_MOUNTS "/sys/fs/cgroup"
#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif

extern char **environ;

struct bind {
    const char *source; /* host path */
    const char *target; /* absolute path inside the rootfs */
    int read_only;
};

struct options {
    const char *status_file;
    const char *sandbox;
    const char *cwd;
    const char *user;
    const char *hostname;
    const char *netns;
    const char *rootfs_lower; /* image rootfs (read-only lower layer) or NULL */
    const char *rootfs_dir;   /* holds upper/, work/ and merged/ for the overlay */
    struct bind *binds;
    size_t n_binds;
    int namespaces;
    char **cgroup_procs;   /* NULL-terminated */
    char **env;            /* NULL-terminated, the workload's whole environment */
    char **argv;           /* NULL-terminated */
    char **masked_paths;   /* NULL-terminated */
    char **readonly_paths; /* NULL-terminated */
    /* confinement */
    int privileged;
    int no_new_privs;
    int cgroupns;
    int have_capabilities;
    unsigned long long capabilities;
    int last_capability; /* /proc/sys/kernel/cap_last_cap */
    struct sock_fprog seccomp;
};

/* What the configuration occupies: freed once the workload runs, so a large argv does not stay
 * in the supervisor's (or the init's) memory for the container's whole life. */
static struct {
    char *text;
    void *lists[8];
    size_t n_lists;
} config_memory;

static void release_config(void)
{
    free(config_memory.text);
    for (size_t i = 0; i < config_memory.n_lists; i++)
        free(config_memory.lists[i]);
    memset(&config_memory, 0, sizeof config_memory);
}

/* Writes all of buf, retrying on EINTR and short writes; returns 0 or -1. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reports a launch error before any child exists: the handshake line, then a non-zero exit. */
static void fail(const char *step, const char *detail, int err)
{
    char line[512];
    int n;
    if (detail != NULL)
        n = snprintf(line, sizeof line, "error %s: %s: %s\n", step, detail, strerror(err));
    else
        n = snprintf(line, sizeof line, "error %s: %s\n", step, strerror(err));
    if (n > 0)
        (void)write_all(STDOUT_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    _exit(2);
}

static void usage_error(const char *message, const char *arg)
{
    char line[512];
    int n = snprintf(line, sizeof line, "error args: %s%s%.200s\n", message, arg ? " " : "",
                     arg ? arg : "");
    if (n > 0)
        (void)write_all(STDOUT_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    _exit(2);
}

static void *allocate(size_t count, size_t size)
{
    void *memory = calloc(count, size);
    if (memory == NULL)
        fail("args", "allocating the configuration", ENOMEM);
    return memory;
}

/* --- the configuration ------------------------------------------------------------------- */

/* Reads fd to EOF into a heap buffer of at most CONFIG_MAX_BYTES; *size gets its length. */
static char *read_config(int fd, size_t *size)
{
    size_t capacity = CONFIG_CHUNK, length = 0;
    char *text = malloc(capacity);
    for (;;) {
        if (text == NULL)
            fail("args", "reading the configuration", ENOMEM);
        if (length == capacity) {
            if (capacity > CONFIG_MAX_BYTES)
                usage_error("the configuration is larger than 16 MiB", NULL);
            capacity = capacity * 2 > CONFIG_MAX_BYTES ? CONFIG_MAX_BYTES + 1 : capacity * 2;
            text = realloc(text, capacity);
            continue;
        }
        ssize_t n = read(fd, text + length, capacity - length);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("args", "reading the configuration", errno);
        if (n == 0)
            break;
        length += (size_t)n;
    }
    if (length > CONFIG_MAX_BYTES)
        usage_error("the configuration is larger than 16 MiB", NULL);
    *size = length;
    return text;
}

struct cursor {
    char *next;
    char *end;
};

/* The next NUL-terminated string, or NULL at the end. */
static char *next_string(struct cursor *at)
{
    if (at->next >= at->end)
        return NULL;
    char *nul = memchr(at->next, '\0', (size_t)(at->end - at->next));
    if (nul == NULL)
        usage_error("the configuration does not end with a NUL", NULL);
    char *string = at->next;
    at->next = nul + 1;
    return string;
}

static char *option_value(struct cursor *at, const char *option)
{
    char *value = next_string(at);
    if (value == NULL)
        usage_error("missing value after", option);
    return value;
}

/* --seccomp LEN <bytes>: copied out, so the program is aligned for struct sock_filter. */
static void take_seccomp(struct cursor *at, struct options *opts, int fill)
{
    char *end;
    const char *text = option_value(at, "--seccomp");
    unsigned long length = strtoul(text, &end, 10);
    if (*text == '\0' || *end != '\0' || length == 0 || length % sizeof(struct sock_filter) != 0 ||
        length / sizeof(struct sock_filter) > BPF_MAXINSNS ||
        length > (size_t)(at->end - at->next))
        usage_error("--seccomp needs the length of a BPF program and its bytes, got", text);
    if (fill) {
        struct sock_filter *program = allocate(1, length);
        memcpy(program, at->next, length);
        config_memory.lists[config_memory.n_lists++] = program;
        opts->seccomp.len = (unsigned short)(length / sizeof(struct sock_filter));
        opts->seccomp.filter = program;
    }
    at->next += length;
}

enum list_id { L_ENV, L_CGROUPS, L_BINDS, L_MASKED, L_READONLY, L_COUNT };

struct lists {
    size_t count[L_COUNT];
};

static void add_to(char **list, size_t *count, char *value, int fill)
{
    if (fill)
        list[*count] = value;
    (*count)++;
}

/* Options with a value that is kept as is; returns 0 if `name` is not one of them. */
static int take_value(struct options *opts, const char *name, const char *value)
{
    static const struct {
        const char *name;
        size_t offset;
    } fields[] = {
        {"--status-file", offsetof(struct options, status_file)},
        {"--sandbox", offsetof(struct options, sandbox)},
        {"--cwd", offsetof(struct options, cwd)},
        {"--user", offsetof(struct options, user)},
        {"--hostname", offsetof(struct options, hostname)},
        {"--netns", offsetof(struct options, netns)},
        {"--rootfs-lower", offsetof(struct options, rootfs_lower)},
        {"--rootfs-dir", offsetof(struct options, rootfs_dir)},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (strcmp(name, fields[i].name) == 0) {
            *(const char **)((char *)opts + fields[i].offset) = value;
            return 1;
        }
    return 0;
}

static int take_flag(struct options *opts, const char *name)
{
    if (strcmp(name, "--no-namespaces") == 0)
        opts->namespaces = 0;
    else if (strcmp(name, "--privileged") == 0)
        opts->privileged = 1;
    else if (strcmp(name, "--no-new-privs") == 0)
        opts->no_new_privs = 1;
    else if (strcmp(name, "--cgroupns") == 0)
        opts->cgroupns = 1;
    else
        return 0;
    return 1;
}

static void take_bind_part(struct options *opts, const char *name, char *value, size_t n_binds,
                           int fill)
{
    struct bind *last = n_binds > 0 ? &opts->binds[n_binds - 1] : NULL;
    if (strcmp(name, "--read-only") == 0) {
        if (fill && (last == NULL || last->target == NULL))
            usage_error("--read-only must follow a --bind SRC --to DST", NULL);
        if (fill)
            last->read_only = 1;
        return;
    }
    /* --to */
    if (fill && (last == NULL || last->target != NULL || value[0] != '/'))
        usage_error("--to needs an absolute path after a --bind, got", value);
    if (fill)
        last->target = value;
}

/* One pass over the options: counting list lengths (fill = 0), or filling the lists sized by
 * the first pass (fill = 1). Returns the cursor at argv. */
static struct cursor walk_options(struct cursor at, struct options *opts, struct lists *sizes,
                                  int fill)
{
    size_t n[L_COUNT] = {0};
    char *name;
    while ((name = next_string(&at)) != NULL && strcmp(name, "--") != 0) {
        if (take_flag(opts, name))
            continue;
        if (strcmp(name, "--read-only") == 0) {
            take_bind_part(opts, name, NULL, n[L_BINDS], fill);
            continue;
        }
        if (strcmp(name, "--seccomp") == 0) {
            take_seccomp(&at, opts, fill);
            continue;
        }
        char *value = option_value(&at, name);
        if (take_value(opts, name, value))
            continue;
        if (strcmp(name, "--capabilities") == 0) {
            char *end;
            errno = 0;
            opts->capabilities = strtoull(value, &end, 0);
            if (*value == '\0' || *end != '\0' || errno != 0)
                usage_error("--capabilities needs a bit mask, got", value);
            opts->have_capabilities = 1;
        } else if (strcmp(name, "--env") == 0) {
            if (strchr(value, '=') == NULL || value[0] == '=')
                usage_error("--env needs KEY=VALUE, got", value);
            add_to(opts->env, &n[L_ENV], value, fill);
        } else if (strcmp(name, "--cgroup-procs") == 0)
            add_to(opts->cgroup_procs, &n[L_CGROUPS], value, fill);
        else if (strcmp(name, "--masked-path") == 0)
            add_to(opts->masked_paths, &n[L_MASKED], value, fill);
        else if (strcmp(name, "--readonly-path") == 0)
            add_to(opts->readonly_paths, &n[L_READONLY], value, fill);
        else if (strcmp(name, "--bind") == 0) {
            if (fill)
                opts->binds[n[L_BINDS]] = (struct bind){value, NULL, 0};
            n[L_BINDS]++;
        } else if (strcmp(name, "--to") == 0)
            take_bind_part(opts, name, value, n[L_BINDS], fill);
        else
            usage_error("unknown option:", name);
    }
    if (name == NULL)
        usage_error("no -- before the command", NULL);
    memcpy(sizes->count, n, sizeof n);
    return at;
}

static char **new_list(size_t count)
{
    char **list = allocate(count + 2, sizeof *list); /* + a default PATH, + NULL */
    config_memory.lists[config_memory.n_lists++] = list;
    return list;
}

static void check_options(const struct options *opts)
{
    if (opts->status_file == NULL || opts->sandbox == NULL)
        usage_error("--status-file and --sandbox are required", NULL);
    for (size_t i = 0; i < opts->n_binds; i++)
        if (opts->binds[i].target == NULL)
            usage_error("every --bind needs its --to", NULL);
    if ((opts->rootfs_lower == NULL) != (opts->rootfs_dir == NULL))
        usage_error("--rootfs-lower and --rootfs-dir go together", NULL);
    int mounts = opts->rootfs_lower != NULL || opts->n_binds > 0 || opts->cgroupns ||
                 opts->masked_paths[0] != NULL || opts->readonly_paths[0] != NULL;
    if (mounts && !opts->namespaces)
        usage_error("--rootfs-lower, --bind and the confinement's paths need namespaces", NULL);
    if (opts->cgroupns && opts->rootfs_lower == NULL)
        usage_error("--cgroupns needs --rootfs-lower", NULL);
    if (!opts->privileged && (!opts->have_capabilities || opts->seccomp.filter == NULL))
        usage_error("--capabilities and --seccomp are required unless --privileged", NULL);
    if (opts->argv[0] == NULL)
        usage_error("no command after --", NULL);
}

/* Parses the configuration text into opts; every array is on the heap, sized by what came. */
static void parse_config(char *text, size_t size, struct options *opts)
{
    struct cursor start = {text, text + size};
    struct lists sizes;
    memset(opts, 0, sizeof *opts);
    opts->namespaces = 1;
    walk_options(start, opts, &sizes, 0);
    memset(opts, 0, sizeof *opts);
    opts->namespaces = 1;
    opts->env = new_list(sizes.count[L_ENV]);
    opts->cgroup_procs = new_list(sizes.count[L_CGROUPS]);
    opts->masked_paths = new_list(sizes.count[L_MASKED]);
    opts->readonly_paths = new_list(sizes.count[L_READONLY]);
    opts->binds = allocate(sizes.count[L_BINDS] + 1, sizeof *opts->binds);
    config_memory.lists[config_memory.n_lists++] = opts->binds;
    opts->n_binds = sizes.count[L_BINDS];
    struct cursor at = walk_options(start, opts, &sizes, 1);
    size_t n_argv = 0;
    for (struct cursor count = at; next_string(&count) != NULL;)
        n_argv++;
    opts->argv = new_list(n_argv);
    for (size_t i = 0; i < n_argv; i++)
        opts->argv[i] = next_string(&at);
    int have_path = 0;
    for (size_t i = 0; i < sizes.count[L_ENV]; i++)
        have_path |= strncmp(opts->env[i], "PATH=", 5) == 0;
    if (!have_path)
        opts->env[sizes.count[L_ENV]] = (char *)DEFAULT_PATH;
    check_options(opts);
}

/* argv is only `--config-fd FD`: nothing of the workload ever appears on a command line. */
static int config_fd_of(int argc, char **argv)
{
    char *end;
    if (argc != 3 || strcmp(argv[1], "--config-fd") != 0)
        usage_error("usage: containerizer-supervisor --config-fd FD", NULL);
    long fd = strtol(argv[2], &end, 10);
    if (argv[2][0] == '\0' || *end != '\0' || fd < 0 || fd > INT_MAX)
        usage_error("--config-fd needs a file descriptor, got", argv[2]);
    return (int)fd;
}

static int read_last_capability(void)
{
    char text[16];
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = '\0';
    int last = atoi(text);
    return last > 0 && last < 64 ? last : -1;
}

/* Field 22 of /proc/PID/stat (start time in clock ticks since boot), or 0 if unreadable. */
static unsigned long long start_time(pid_t pid)
{
    char path[64], buf[1024];
    ssize_t n;
    int fd, field;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    if (p == NULL)
        return 0;
    /* After ") " comes field 3; skip to field 22. */
    for (field = 2; field < 22 && p != NULL; field++) {
        p = strchr(p + 1, ' ');
    }
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

/* --- the child: everything between fork and exec ------------------------------------------- */

/* Tells the supervisor which step failed (through the close-on-exec pipe) and exits. */
static void child_fail(int errpipe, const char *step, const char *detail, const char *reason)
{
    char msg[512];
    int n;
    if (detail != NULL)
        n = snprintf(msg, sizeof msg, "%s: %s: %s", step, detail, reason);
    else
        n = snprintf(msg, sizeof msg, "%s: %s", step, reason);
    if (n > 0)
        (void)write_all(errpipe, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    _exit(127);
}

static void join_cgroups(int errpipe, char **cgroup_procs)
{
    for (; *cgroup_procs != NULL; cgroup_procs++) {
        int fd = open(*cgroup_procs, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, "0", 1) < 0)
            child_fail(errpipe, "cgroup", *cgroup_procs, strerror(errno));
        close(fd);
    }
}

static void join_netns(int errpipe, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) < 0)
        child_fail(errpipe, "netns", path, strerror(errno));
    close(fd);
}

/* --- the container's root filesystem -------------------------------------------------------- */

/* root + suffix into path (PATH_MAX); a path too long fails the launch instead of truncating. */
static void join_path(int errpipe, char *path, const char *root, const char *suffix)
{
    int n = snprintf(path, PATH_MAX, "%s%s", root, suffix);
    if (n < 0 || n >= PATH_MAX)
        child_fail(errpipe, "rootfs", suffix, "path too long");
}

static void mount_or_fail(int errpipe, const char *source, const char *target, const char *type,
                          unsigned long flags, const char *data)
{
    if (mount(source, target, type, flags, data) < 0)
        child_fail(errpipe, "rootfs", target, strerror(errno));
}

/* Creates every missing directory of `path` (absolute), and the last component as a directory
 * or, when as_file, as an empty file: the mount point for a bind of the same kind. */
static void make_mount_point(int errpipe, char *path, int as_file)
{
    for (char *slash = strchr(path + 1, '/'); slash != NULL; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            child_fail(errpipe, "rootfs", path, strerror(errno));
        *slash = '/';
    }
    int fd = as_file ? open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644) : -1;
    if (as_file ? fd < 0 : mkdir(path, 0755) < 0 && errno != EEXIST)
        child_fail(errpipe, "rootfs", path, strerror(errno));
    if (fd >= 0)
        close(fd);
}

static void bind_into(int errpipe, const char *root, const char *source, const char *target,
                      int read_only)
{
    char path[PATH_MAX];
    struct stat info;
    if (stat(source, &info) < 0)
        child_fail(errpipe, "bind", source, strerror(errno));
    join_path(errpipe, path, root, target);
    make_mount_point(errpipe, path, !S_ISDIR(info.st_mode));
    mount_or_fail(errpipe, source, path, NULL, MS_BIND | MS_REC, NULL);
    if (read_only) /* a bind takes MS_RDONLY only on a remount */
        mount_or_fail(errpipe, NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
}

/* A tmpfs /dev with the host's harmless character devices bound in, a private devpts and shm. */
static void populate_dev(int errpipe, const char *root)
{
    static const char *const devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    char path[PATH_MAX];
    join_path(errpipe, path, root, "/dev");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "tmpfs", path, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=64k");
    for (size_t i = 0; i < sizeof devices / sizeof devices[0]; i++) {
        char device[32];
        snprintf(device, sizeof device, "/dev/%s", devices[i]);
        bind_into(errpipe, root, device, device, 0); /* the host's node onto its path inside */
    }
    join_path(errpipe, path, root, "/dev/pts");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "devpts", path, "devpts", MS_NOSUID | MS_NOEXEC,
                  "newinstance,ptmxmode=0666,mode=0620");
    join_path(errpipe, path, root, "/dev/shm");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "shm", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k");
    static const char *const links[][2] = {{"/proc/self/fd", "fd"},     {"/proc/self/fd/0", "stdin"},
                                           {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
                                           {"pts/ptmx", "ptmx"}};
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        char inside[32];
        snprintf(inside, sizeof inside, "/dev/%s", links[i][1]);
        join_path(errpipe, path, root, inside);
        if (symlink(links[i][0], path) < 0)
            child_fail(errpipe, "rootfs", path, strerror(errno));
    }
}

/* A cgroup v1 mount's super options without what must not (rw: we mount read-only) or may not
 * (release_agent, refused inside a cgroup namespace) be given again: its controllers, name=. */
static void cgroup_mount_data(char *options, char *data, size_t size)
{
    size_t used = 0;
    data[0] = '\0';
    for (char *save = NULL, *option = strtok_r(options, ",", &save); option != NULL;
         option = strtok_r(NULL, ",", &save)) {
        if (strcmp(option, "rw") == 0 || strcmp(option, "ro") == 0 ||
            strncmp(option, "release_agent=", 14) == 0)
            continue;
        int n = snprintf(data + used, size - used, "%s%s", used ? "," : "", option);
        if (n < 0 || (size_t)n >= size - used)
            return;
        used += (size_t)n;
    }
}

/* One of the host's cgroup hierarchies, read-only under dir (the namespace's view of it). */
static void mount_hierarchy(int errpipe, const char *dir, const char *fstype, char *options)
{
    char data[256];
    unsigned long flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC;
    if (mkdir(dir, 0555) < 0 && errno != EEXIST)
        child_fail(errpipe, "cgroupfs", dir, strerror(errno));
    if (strcmp(fstype, "cgroup2") == 0) {
        if (mount("cgroup2", dir, "cgroup2", flags, NULL) < 0)
            child_fail(errpipe, "cgroupfs", dir, strerror(errno));
        return;
    }
    cgroup_mount_data(options, data, sizeof data);
    if (mount("cgroup", dir, "cgroup", flags, data) < 0)
        child_fail(errpipe, "cgroupfs", dir, strerror(errno));
}

/* Splits a /proc/self/mountinfo line into its mount point, fstype and super options. */
static int mountinfo_fields(char *line, char **point, char **fstype, char **options)
{
    char *save = NULL, *field = strtok_r(line, " \n", &save);
    for (int i = 0; field != NULL && i < 4; i++)
        field = strtok_r(NULL, " \n", &save);
    *point = field;
    while (field != NULL && strcmp(field, "-") != 0)
        field = strtok_r(NULL, " \n", &save);
    *fstype = strtok_r(NULL, " \n", &save);
    (void)strtok_r(NULL, " \n", &save); /* source */
    *options = strtok_r(NULL, " \n", &save);
    return *point != NULL && *fstype != NULL && *options != NULL;
}

/* root/sys/fs/cgroup as the container sees it: a read-only tmpfs with each host hierarchy
 * mounted read-only from inside the cgroup namespace (or the unified hierarchy itself). */
static void mount_cgroupfs(int errpipe, const char *root)
{
    char target[PATH_MAX], dir[PATH_MAX];
    const size_t prefix = sizeof CGROUP_MOUNTS; /* "/sys/fs/cgroup/" */
    char *line = NULL, *point, *fstype, *options;
    size_t capacity = 0;
    FILE *mounts = fopen("/proc/self/mountinfo", "re");
    if (mounts == NULL)
        child_fail(errpipe, "cgroupfs", "/proc/self/mountinfo", strerror(errno));
    join_path(errpipe, target, root, CGROUP_MOUNTS);
    int tmpfs = 0;
    while (getline(&line, &capacity, mounts) > 0) {
        if (!mountinfo_fields(line, &point, &fstype, &options) || strncmp(fstype, "cgroup", 6))
            continue;
        if (strcmp(point, CGROUP_MOUNTS) == 0 && strcmp(fstype, "cgroup2") == 0) {
            mount_hierarchy(errpipe, target, fstype, options); /* a cgroup v2 only host */
            break;
        }
        if (strncmp(point, CGROUP_MOUNTS "/", prefix) || strpbrk(point + prefix, "/\\"))
            continue;
        if (!tmpfs++)
            mount_or_fail(errpipe, "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          "mode=755,size=64k");
        join_path(errpipe, dir, target, point + prefix - 1);
        mount_hierarchy(errpipe, dir, fstype, options);
    }
    free(line);
    fclose(mounts);
    if (tmpfs)
        mount_or_fail(errpipe, NULL, target, NULL,
                      MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755");
}

/* Mounts the overlay, /proc, /dev, /sys and the binds under rootfs_dir/merged, then makes it /. */
static void enter_rootfs(int errpipe, const struct options *opts)
{
    char root[PATH_MAX], path[PATH_MAX], data[3 * PATH_MAX + 64];
    if (snprintf(root, sizeof root, "%s/merged", opts->rootfs_dir) >= (int)sizeof root ||
        snprintf(data, sizeof data, "lowerdir=%s,upperdir=%s/upper,workdir=%s/work",
                 opts->rootfs_lower, opts->rootfs_dir, opts->rootfs_dir) >= (int)sizeof data)
        child_fail(errpipe, "rootfs", opts->rootfs_dir, "path too long");
    mount_or_fail(errpipe, "overlay", root, "overlay", 0, data);
    join_path(errpipe, path, root, "/proc");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "proc", path, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    populate_dev(errpipe, root);
    join_path(errpipe, path, root, "/sys");
    make_mount_point(errpipe, path, 0);
    mount_or_fail(errpipe, "sysfs", path, "sysfs",
                  (opts->privileged ? 0 : MS_RDONLY) | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    if (opts->cgroupns)
        mount_cgroupfs(errpipe, root);
    for (size_t i = 0; i < opts->n_binds; i++)
        bind_into(errpipe, root, opts->binds[i].source, opts->binds[i].target,
                  opts->binds[i].read_only);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours. */
    if (chdir(root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 ||
        chdir("/") < 0)
        child_fail(errpipe, "pivot_root", root, strerror(errno));
}

/* Hides each masked path (a file under /dev/null, a directory under an empty read-only tmpfs)
 * and makes each read-only path read-only; a path this kernel does not have is skipped. */
static void confine_paths(int errpipe, const struct options *opts)
{
    const unsigned long locked = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC;
    struct stat info;
    for (char **path = opts->masked_paths; *path != NULL; path++) {
        if (stat(*path, &info) < 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            child_fail(errpipe, "masked-path", *path, strerror(errno));
        }
        if (S_ISDIR(info.st_mode) ? mount("tmpfs", *path, "tmpfs", locked, "mode=555,size=4k") < 0
                                  : mount("/dev/null", *path, NULL, MS_BIND, NULL) < 0)
            child_fail(errpipe, "masked-path", *path, strerror(errno));
    }
    for (char **path = opts->readonly_paths; *path != NULL; path++) {
        if (mount(*path, *path, NULL, MS_BIND | MS_REC, NULL) < 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            child_fail(errpipe, "readonly-path", *path, strerror(errno));
        }
        if (mount(NULL, *path, NULL, MS_BIND | MS_REMOUNT | locked, NULL) < 0)
            child_fail(errpipe, "readonly-path", *path, strerror(errno));
    }
}

static void enter_namespaces(int errpipe, const struct options *opts)
{
    /* The cgroup namespace comes after join_cgroups: the container's cgroups are its root. */
    if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (opts->cgroupns ? CLONE_NEWCGROUP : 0)) <
        0)
        child_fail(errpipe, "namespaces", NULL, strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        child_fail(errpipe, "mount", "make / private", strerror(errno));
    if (opts->rootfs_lower != NULL)
        enter_rootfs(errpipe, opts);
    else {
        for (size_t i = 0; i < opts->n_binds; i++)
            bind_into(errpipe, "", opts->binds[i].source, opts->binds[i].target,
                      opts->binds[i].read_only);
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            child_fail(errpipe, "proc", "/proc", strerror(errno));
    }
    confine_paths(errpipe, opts);
    if (opts->hostname != NULL) {
        size_t len = strlen(opts->hostname);
        if (sethostname(opts->hostname, len > HOSTNAME_MAX_LEN ? HOSTNAME_MAX_LEN : len) < 0)
            child_fail(errpipe, "hostname", NULL, strerror(errno));
    }
}

/* --- the sandbox's files ------------------------------------------------------------------ */

static int sandbox_fd = -1; /* the sandbox directory, close-on-exec, kept until the exec */
static struct stat sandbox_files[3]; /* the directory, stdout and stderr as opened */

/* sandbox/<name> onto target: never through a symlink, never a file linked from elsewhere. */
static void open_output(int errpipe, const struct options *opts, const char *name, int target)
{
    char shown[PATH_MAX];
    struct stat *info = &sandbox_files[target];
    snprintf(shown, sizeof shown, "%s/%s", opts->sandbox, name);
    int fd = openat(sandbox_fd, name, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0)
        child_fail(errpipe, name, shown, strerror(errno));
    if (fstat(fd, info) < 0 || !S_ISREG(info->st_mode) || info->st_nlink != 1)
        child_fail(errpipe, name, shown, "not a regular file of its own");
    if (dup2(fd, target) < 0) /* dup2 clears close-on-exec on target */
        child_fail(errpipe, name, shown, strerror(errno));
    close(fd);
}

/* The workload's stdio, opened before any namespace or root change: the paths are the host's. */
static void open_stdio(const struct options *opts, int errpipe)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || dup2(fd, STDIN_FILENO) < 0)
        child_fail(errpipe, "stdin", "/dev/null", strerror(errno));
    close(fd);
    sandbox_fd = open(opts->sandbox, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (sandbox_fd < 0 || fstat(sandbox_fd, &sandbox_files[0]) < 0)
        child_fail(errpipe, "sandbox", opts->sandbox, strerror(errno));
    open_output(errpipe, opts, "stdout", STDOUT_FILENO);
    open_output(errpipe, opts, "stderr", STDERR_FILENO);
}

/* fd (described by info) owned by uid:gid with mode; what already is so is left alone (each
 * change is an inode write: a launch into a fresh sandbox as root needs one). */
static int give(int fd, const struct stat *info, uid_t uid, gid_t gid, mode_t mode)
{
    if ((info->st_uid != uid || info->st_gid != gid) && fchown(fd, uid, gid) < 0)
        return -1;
    return (info->st_mode & 07777) != mode ? fchmod(fd, mode) : 0;
}

/* The container's user owns its sandbox and what it writes there; other host users read none. */
static void give_sandbox(int errpipe, const struct options *opts, uid_t uid, gid_t gid)
{
    if (give(sandbox_fd, &sandbox_files[0], uid, gid, 0750) < 0 ||
        give(STDOUT_FILENO, &sandbox_files[STDOUT_FILENO], uid, gid, 0640) < 0 ||
        give(STDERR_FILENO, &sandbox_files[STDERR_FILENO], uid, gid, 0640) < 0)
        child_fail(errpipe, "sandbox", opts->sandbox, strerror(errno));
}

/* --- who the workload runs as, and what it may do ----------------------------------------- */

struct identity {
    uid_t uid;
    gid_t gid;
    const char *name; /* for initgroups; NULL: a uid without a passwd entry */
};

/* --user: a name (its groups from /etc/group) or a uid (its passwd entry if any, else
 * gid = uid and no supplementary groups). */
static struct identity resolve_user(int errpipe, const char *user)
{
    char *end;
    unsigned long numeric;
    errno = 0;
    numeric = strtoul(user, &end, 10);
    int is_numeric = user[0] != '\0' && *end == '\0' && errno == 0 && numeric <= UINT_MAX - 1;
    errno = 0;
    struct passwd *pw = is_numeric ? getpwuid((uid_t)numeric) : getpwnam(user);
    if (pw == NULL && !is_numeric) {
        int unknown = errno == 0 || errno == ENOENT || errno == ESRCH;
        child_fail(errpipe, "user", user,
                   unknown ? "no such user in the passwd database" : strerror(errno));
    }
    struct identity who = {pw ? pw->pw_uid : (uid_t)numeric, pw ? pw->pw_gid : (gid_t)numeric,
                           pw ? pw->pw_name : NULL};
    return who;
}

static void become(int errpipe, const struct identity *who)
{
    if (who->name != NULL ? initgroups(who->name, who->gid) < 0 : setgroups(0, NULL) < 0)
        child_fail(errpipe, "user", "setgroups", strerror(errno));
    if (setgid(who->gid) < 0)
        child_fail(errpipe, "user", "setgid", strerror(errno));
    if (setuid(who->uid) < 0)
        child_fail(errpipe, "user", "setuid", strerror(errno));
}

static int set_capabilities(unsigned long long permitted, unsigned long long inheritable)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        data[i].effective = data[i].permitted = (uint32_t)(permitted >> (32 * i));
        data[i].inheritable = (uint32_t)(inheritable >> (32 * i));
    }
    return (int)syscall(SYS_capset, &header, data);
}

/* Cuts the bounding set to the container's capabilities and clears the ambient set: nothing a
 * process here execs can ever gain more. */
static void drop_bounding_set(int errpipe, const struct options *opts)
{
    for (int cap = 0; cap <= opts->last_capability; cap++)
        if (!(opts->capabilities & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
            child_fail(errpipe, "capabilities", "bounding set", strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        child_fail(errpipe, "capabilities", "ambient set", strerror(errno));
}

/* no_new_privs, the seccomp filter and root's last capabilities: the steps right before exec. */
static void confine(int errpipe, const struct options *opts, int as_root)
{
    const unsigned long long sys_admin = 1ULL << CAP_SYS_ADMIN;
    if (opts->privileged) {
        if (opts->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            child_fail(errpipe, "no_new_privs", NULL, strerror(errno));
        return;
    }
    /* Root keeps CAP_SYS_ADMIN only until the filter is loaded: without no_new_privs only a
     * holder of it may load one. */
    if (as_root && set_capabilities(opts->capabilities | sys_admin, opts->capabilities) < 0)
        child_fail(errpipe, "capabilities", NULL, strerror(errno));
    if ((opts->no_new_privs || !as_root) && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        child_fail(errpipe, "no_new_privs", NULL, strerror(errno));
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &opts->seccomp, 0, 0) < 0)
        child_fail(errpipe, "seccomp", NULL, strerror(errno));
    if (as_root && set_capabilities(opts->capabilities, opts->capabilities) < 0)
        child_fail(errpipe, "capabilities", NULL, strerror(errno));
}

static void reset_signals(void)
{
    sigset_t none;
    int sig;
    for (sig = 1; sig < NSIG; sig++)
        (void)signal(sig, SIG_DFL); /* fails harmlessly for SIGKILL, SIGSTOP and libc's own */
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
}

static void close_other_fds(int errpipe)
{
    /* Close-on-exec rather than close, so the error pipe keeps working until exec. */
    if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) == 0)
        return;
    long max = sysconf(_SC_OPEN_MAX);
    for (int fd = 3; fd < (max > 0 ? max : 1024); fd++)
        if (fd != errpipe)
            (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static void exec_workload(const struct options *opts, int errpipe)
{
    struct identity who = {0, 0, NULL};
    if (opts->cwd != NULL && chdir(opts->cwd) < 0)
        child_fail(errpipe, "cwd", opts->cwd, strerror(errno));
    if (opts->user != NULL)
        who = resolve_user(errpipe, opts->user);
    give_sandbox(errpipe, opts, who.uid, who.gid);
    if (!opts->privileged && !opts->namespaces)
        drop_bounding_set(errpipe, opts); /* with namespaces the init did, before the fork */
    if (opts->user != NULL)
        become(errpipe, &who);
    close_other_fds(errpipe);
    reset_signals();
    environ = opts->env; /* execvp searches the workload's PATH, not ours */
    confine(errpipe, opts, who.uid == 0);
    execvp(opts->argv[0], opts->argv);
    child_fail(errpipe, "exec", NULL, strerror(errno));
}

/* --- the container's init (pid 1 of its pid namespace) ----------------------------------- */

static volatile sig_atomic_t workload_pid;
static volatile sig_atomic_t pending_signal; /* arrived before the workload existed */

static void forward_signal(int sig)
{
    if (workload_pid > 0)
        (void)kill((pid_t)workload_pid, sig);
    else
        pending_signal = sig;
}

static void forward_signals(void)
{
    static const int forwarded[] = {SIGHUP, SIGINT,  SIGQUIT, SIGTERM, SIGUSR1,
                                    SIGUSR2, SIGALRM, SIGWINCH, SIGCONT};
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward_signal;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        (void)sigaction(forwarded[i], &action, NULL);
}

/* Forks the workload as pid 2, then forwards signals and reaps until the workload ends; its
 * wait status goes to the supervisor through statuspipe. Never returns. */
static void run_init(const struct options *opts, int errpipe, int statuspipe)
{
    int wstatus;
    /* Handlers first: once the supervisor reports the launch, a signal must reach the workload;
     * one that comes before the workload exists is held and sent right after the fork. */
    forward_signals();
    pid_t pid = fork();
    if (pid < 0)
        child_fail(errpipe, "fork", "workload", strerror(errno));
    if (pid == 0) {
        close(statuspipe);
        exec_workload(opts, errpipe); /* resets the handlers before exec */
    }
    workload_pid = pid;
    if (pending_signal != 0)
        (void)kill(pid, pending_signal);
    /* The init keeps no more than a root workload gets (CAP_KILL among them, to forward
     * signals to a workload of another user): nothing in it is worth taking over. */
    if (!opts->privileged && set_capabilities(opts->capabilities, 0) < 0) {
        (void)kill(pid, SIGKILL);
        child_fail(errpipe, "capabilities", "init", strerror(errno));
    }
    close(errpipe); /* the workload's copy alone tells the supervisor whether exec succeeded */
    close(sandbox_fd);
    release_config();
    for (;;) {
        pid_t reaped = waitpid(-1, &wstatus, 0);
        if (reaped == pid)
            break;
        if (reaped < 0 && errno != EINTR)
            _exit(126);
    }
    (void)write_all(statuspipe, (const char *)&wstatus, sizeof wstatus);
    _exit(0);
}

static void run_child(const struct options *opts, int errpipe, int statuspipe)
{
    join_cgroups(errpipe, opts->cgroup_procs); /* first: nothing of ours runs outside them */
    open_stdio(opts, errpipe);
    if (opts->netns != NULL)
        join_netns(errpipe, opts->netns);
    if (!opts->namespaces)
        exec_workload(opts, errpipe);
    enter_namespaces(errpipe, opts);
    if (!opts->privileged)
        drop_bounding_set(errpipe, opts); /* the init's too */
    run_init(opts, errpipe, statuspipe);
}

/* --- the supervisor ------------------------------------------------------------------------ */

static void ignore_signals(void)
{
    static const int ignored[] = {SIGHUP,  SIGINT,  SIGQUIT, SIGPIPE, SIGTERM, SIGUSR1,
                                  SIGUSR2, SIGALRM, SIGTSTP, SIGTTIN, SIGTTOU, SIGVTALRM,
                                  SIGPROF, SIGXCPU, SIGXFSZ, SIGPOLL};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++)
        (void)signal(ignored[i], SIG_IGN);
}

/* Opens the status file's directory now, so that a status file that cannot be written fails
 * the launch instead of being lost at exit, and so that the name survives chdir("/"). The
 * file's base name is copied into base (NAME_MAX + 1): the configuration is freed later. */
static int open_status_dir(const char *status_file, char *base)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(status_file, '/');
    const char *name = slash ? slash + 1 : status_file;
    if (*name == '\0' || strlen(name) > NAME_MAX)
        usage_error("--status-file names a directory or is too long:", status_file);
    strcpy(base, name);
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == status_file)
        snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - status_file) >= sizeof dir)
        usage_error("--status-file too long:", status_file);
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - status_file), status_file);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        fail("status-file", dir, errno);
    if (faccessat(fd, ".", W_OK, AT_EACCESS) < 0)
        fail("status-file", dir, errno);
    return fd;
}

/* Starts the child and returns its pid once it exec'd; on failure, reports and exits. */
static pid_t launch(const struct options *opts, int statuspipe)
{
    int errpipe[2];
    char reason[512];
    ssize_t n;
    size_t got = 0;
    pid_t pid;
    if (pipe2(errpipe, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    if (opts->namespaces && unshare(CLONE_NEWPID) < 0)
        fail("pidns", NULL, errno);
    pid = fork();
    if (pid < 0)
        fail("fork", NULL, errno);
    if (pid == 0) {
        close(errpipe[0]);
        run_child(opts, errpipe[1], statuspipe);
    }
    close(errpipe[1]);
    while ((n = read(errpipe[0], reason + got, sizeof reason - 1 - got)) != 0) {
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        got += (size_t)n;
        if (got == sizeof reason - 1)
            break;
    }
    close(errpipe[0]);
    if (got == 0)
        return pid; /* EOF without a word: exec succeeded */
    reason[got] = '\0';
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    char line[600];
    int len = snprintf(line, sizeof line, "error %s\n", reason);
    (void)write_all(STDOUT_FILENO, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
    _exit(1);
}

/* Writes the status atomically and durably: temp file, fsync, rename, fsync the directory. */
static int record_status(int dirfd, const char *base, int wstatus, const struct timespec *when)
{
    char tmp[NAME_MAX + 8], body[128];
    int n, fd;
    if (snprintf(tmp, sizeof tmp, "%s.tmp", base) >= (int)sizeof tmp)
        return -1;
    if (WIFSIGNALED(wstatus))
        n = snprintf(body, sizeof body, "signaled %d\n", WTERMSIG(wstatus));
    else
        n = snprintf(body, sizeof body, "exited %d\n", WEXITSTATUS(wstatus));
    n += snprintf(body + n, sizeof body - (size_t)n, "finished %lld.%03ld\n",
                  (long long)when->tv_sec, when->tv_nsec / 1000000L);
    fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    if (write_all(fd, body, (size_t)n) < 0 || fsync(fd) < 0) {
        close(fd);
        return -1;
    }
    if (close(fd) < 0 || renameat(dirfd, tmp, dirfd, base) < 0)
        return -1;
    return fsync(dirfd);
}

/* Guarantees fds 0-2 exist, so no pipe or file of ours lands on them by accident. */
static int open_devnull(void)
{
    int fd;
    do {
        fd = open("/dev/null", O_RDWR);
        if (fd < 0)
            _exit(2);
    } while (fd <= STDERR_FILENO);
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

/* The configuration from fd, which is then replaced by /dev/null (or closed). */
static void load_options(int fd, int devnull, struct options *opts)
{
    size_t size;
    char *text = read_config(fd, &size);
    if (fd <= STDERR_FILENO)
        (void)dup2(devnull, fd);
    else
        close(fd);
    config_memory.text = text;
    parse_config(text, size, opts);
    if (!opts->privileged) {
        opts->last_capability = read_last_capability();
        if (opts->last_capability < 0)
            fail("capabilities", "/proc/sys/kernel/cap_last_cap", errno ? errno : EINVAL);
    }
}

int main(int argc, char **argv)
{
    struct options opts;
    char base[NAME_MAX + 1], line[128];
    int wstatus, len;
    struct timespec finished;
    pid_t pid;

    int devnull = open_devnull();
    ignore_signals();
    load_options(config_fd_of(argc, argv), devnull, &opts);
    int dirfd = open_status_dir(opts.status_file, base);
    int statuspipe[2];
    if (pipe2(statuspipe, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    pid = launch(&opts, statuspipe[1]);
    close(statuspipe[1]);
    release_config();

    len = snprintf(line, sizeof line, "ok %d %llu %llu\n", (int)pid, start_time(pid),
                   start_time(getpid()));
    if (write_all(STDOUT_FILENO, line, (size_t)len) < 0) {
        /* Nobody heard of this container, so nobody would ever stop it: do not leave it. */
        kill(pid, SIGKILL);
    }
    /* Detach from whatever the service gave us; never touch a terminal again. */
    (void)dup2(devnull, STDIN_FILENO);
    (void)dup2(devnull, STDOUT_FILENO);
    (void)dup2(devnull, STDERR_FILENO);
    close(devnull);
    (void)chdir("/");

    while (waitpid(pid, &wstatus, 0) < 0) {
        if (errno != EINTR)
            return 3;
    }
    clock_gettime(CLOCK_REALTIME, &finished);
    /* With namespaces the child is our init: the workload's own status comes through the pipe.
     * No word there means the init itself was killed (destroy): its status is the answer. */
    int workload_status;
    if (read(statuspipe[0], &workload_status, sizeof workload_status) ==
        (ssize_t)sizeof workload_status)
        wstatus = workload_status;
    return record_status(dirfd, base, wstatus, &finished) == 0 ? 0 : 4;
}
