/*
 * containerizer-supervisor: reaps one container's workload and records how it ended.
 *
 * The Python service must be able to die and restart while containers keep running, and a Python
 * process per container costs far more than the 3 MiB RSS budget. So each container gets this
 * small program: it forks the workload (pid 1 of a new pid namespace unless --no-namespaces),
 * tells the service over its stdout whether the exec succeeded, waits for the workload, and
 * writes the exit status atomically to --status-file, where a restarted service finds it.
 *
 * Usage:
 *   containerizer-supervisor --status-file F --stdout F --stderr F [--cgroup-procs P]...
 *       [--cwd DIR] [--user NAME|UID] [--hostname NAME] [--env K=V]... [--no-namespaces]
 *       [--netns PATH] [--rootfs-lower DIR --rootfs-dir DIR]
 *       [--bind SRC --to DST [--read-only]]...
 *       -- argv...
 *
 * --netns PATH: the child joins the network namespace bound at PATH (setns(CLONE_NEWNET), e.g.
 * /run/netns/NAME prepared by the network isolator) after joining its cgroups and before the
 * other unshares, so the workload's first instruction already runs on the container's network.
 *
 * --rootfs-lower DIR --rootfs-dir DIR: the workload's / is an overlay of the read-only image
 * rootfs DIR (lower) with DIR/upper and DIR/work, mounted at DIR/merged inside the container's
 * own mount namespace (so the mount dies with the container; nothing on the host to leak), with
 * a fresh /proc, a minimal /dev, a read-only /sys and each --bind SRC --to DST (host path onto
 * a path inside the rootfs; --read-only after one makes it read-only), then pivot_root (Mesos'
 * filesystem/linux isolator). stdout and
 * stderr are opened before any of that: their paths are the host's.
 *
 * Handshake (one line on stdout, then stdout is /dev/null):
 *   ok <child_host_pid> <child_start_time> <supervisor_start_time>
 * (the child is the container's init with namespaces, the workload itself without)
 *   error <step>: <reason>                       (exit status 1; no status file is written)
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
 * 2 bad arguments or a failure before the fork (error line written); 3 waitpid failed;
 * 4 the status file could not be written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HOSTNAME_MAX_LEN 63
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

extern char **environ;

struct options {
    const char *status_file;
    const char *stdout_path;
    const char *stderr_path;
    const char *cwd;
    const char *user;
    const char *hostname;
    const char *netns;
    const char *rootfs_lower; /* image rootfs (read-only lower layer) or NULL */
    const char *rootfs_dir;   /* holds upper/, work/ and merged/ for the overlay */
    char **bind_sources;      /* NULL-terminated, pairs with bind_targets */
    char **bind_targets;
    int *bind_read_only;      /* per bind: 1 to remount it read-only */
    int namespaces;
    char **cgroup_procs; /* NULL-terminated */
    char **env;          /* NULL-terminated, the workload's whole environment */
    char **argv;         /* NULL-terminated */
};

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
    int n = snprintf(line, sizeof line, "error args: %s%s%s\n", message, arg ? " " : "",
                     arg ? arg : "");
    if (n > 0)
        (void)write_all(STDOUT_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    _exit(2);
}

/* Parses argv into opts; env and cgroup_procs point into caller-provided arrays of argc + 2. */
static void parse_args(int argc, char **argv, struct options *opts, char **env, char **cgroups,
                       char **bind_sources, char **bind_targets, int *bind_read_only)
{
    int n_env = 0, n_cgroups = 0, n_sources = 0, n_targets = 0, have_path = 0, i;
    memset(opts, 0, sizeof *opts);
    opts->namespaces = 1;
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(arg, "--no-namespaces") == 0) {
            opts->namespaces = 0;
            continue;
        }
        if (strcmp(arg, "--read-only") == 0) {
            if (n_targets == 0 || n_targets != n_sources)
                usage_error("--read-only must follow a --bind SRC --to DST", NULL);
            bind_read_only[n_targets - 1] = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage_error("missing value or unknown option:", arg);
        char *value = argv[++i];
        if (strcmp(arg, "--status-file") == 0)
            opts->status_file = value;
        else if (strcmp(arg, "--stdout") == 0)
            opts->stdout_path = value;
        else if (strcmp(arg, "--stderr") == 0)
            opts->stderr_path = value;
        else if (strcmp(arg, "--cwd") == 0)
            opts->cwd = value;
        else if (strcmp(arg, "--user") == 0)
            opts->user = value;
        else if (strcmp(arg, "--hostname") == 0)
            opts->hostname = value;
        else if (strcmp(arg, "--netns") == 0)
            opts->netns = value;
        else if (strcmp(arg, "--rootfs-lower") == 0)
            opts->rootfs_lower = value;
        else if (strcmp(arg, "--rootfs-dir") == 0)
            opts->rootfs_dir = value;
        else if (strcmp(arg, "--bind") == 0)
            bind_sources[n_sources++] = value;
        else if (strcmp(arg, "--to") == 0) {
            if (n_targets >= n_sources || value[0] != '/')
                usage_error("--to needs an absolute path after a --bind, got", value);
            bind_read_only[n_targets] = 0;
            bind_targets[n_targets++] = value;
        }
        else if (strcmp(arg, "--cgroup-procs") == 0)
            cgroups[n_cgroups++] = value;
        else if (strcmp(arg, "--env") == 0) {
            if (strchr(value, '=') == NULL || value[0] == '=')
                usage_error("--env needs KEY=VALUE, got", value);
            if (strncmp(value, "PATH=", 5) == 0)
                have_path = 1;
            env[n_env++] = value;
        } else
            usage_error("unknown option:", arg);
    }
    if (!have_path)
        env[n_env++] = (char *)DEFAULT_PATH;
    env[n_env] = NULL;
    cgroups[n_cgroups] = NULL;
    bind_sources[n_sources] = NULL;
    bind_targets[n_targets] = NULL;
    opts->bind_sources = bind_sources;
    opts->bind_targets = bind_targets;
    opts->bind_read_only = bind_read_only;
    if (n_sources != n_targets)
        usage_error("every --bind needs its --to", NULL);
    if ((opts->rootfs_lower == NULL) != (opts->rootfs_dir == NULL))
        usage_error("--rootfs-lower and --rootfs-dir go together", NULL);
    if ((opts->rootfs_lower != NULL || n_sources > 0) && !opts->namespaces)
        usage_error("--rootfs-lower and --bind need namespaces", NULL);
    opts->env = env;
    opts->cgroup_procs = cgroups;
    opts->argv = &argv[i];
    if (opts->status_file == NULL || opts->stdout_path == NULL || opts->stderr_path == NULL)
        usage_error("--status-file, --stdout and --stderr are required", NULL);
    if (i >= argc)
        usage_error("no command after --", NULL);
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
    mount_or_fail(errpipe, "sysfs", path, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  NULL);
    for (size_t i = 0; opts->bind_sources[i] != NULL; i++)
        bind_into(errpipe, root, opts->bind_sources[i], opts->bind_targets[i],
                  opts->bind_read_only[i]);
    /* pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours. */
    if (chdir(root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 ||
        chdir("/") < 0)
        child_fail(errpipe, "pivot_root", root, strerror(errno));
}

static void enter_namespaces(int errpipe, const struct options *opts)
{
    if (unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC) < 0)
        child_fail(errpipe, "namespaces", NULL, strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        child_fail(errpipe, "mount", "make / private", strerror(errno));
    if (opts->rootfs_lower != NULL)
        enter_rootfs(errpipe, opts);
    else {
        for (size_t i = 0; opts->bind_sources[i] != NULL; i++)
            bind_into(errpipe, "", opts->bind_sources[i], opts->bind_targets[i],
                      opts->bind_read_only[i]);
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            child_fail(errpipe, "proc", "/proc", strerror(errno));
    }
    if (opts->hostname != NULL) {
        size_t len = strlen(opts->hostname);
        if (sethostname(opts->hostname, len > HOSTNAME_MAX_LEN ? HOSTNAME_MAX_LEN : len) < 0)
            child_fail(errpipe, "hostname", NULL, strerror(errno));
    }
}

static void open_as(int errpipe, const char *step, const char *path, int flags, int target)
{
    int fd = open(path, flags | O_CLOEXEC, 0644);
    if (fd < 0)
        child_fail(errpipe, step, path, strerror(errno));
    if (dup2(fd, target) < 0) /* dup2 clears close-on-exec on target */
        child_fail(errpipe, step, path, strerror(errno));
    close(fd);
}

/* Switches to --user: a name (its groups from /etc/group) or a uid (its passwd entry if any,
 * else gid = uid and no supplementary groups). */
static void become_user(int errpipe, const char *user)
{
    char *end;
    struct passwd *pw;
    uid_t uid;
    gid_t gid;
    unsigned long numeric;
    errno = 0;
    numeric = strtoul(user, &end, 10);
    int is_numeric = user[0] != '\0' && *end == '\0' && errno == 0 && numeric <= UINT_MAX - 1;
    errno = 0;
    pw = is_numeric ? getpwuid((uid_t)numeric) : getpwnam(user);
    if (pw == NULL && !is_numeric) {
        int unknown = errno == 0 || errno == ENOENT || errno == ESRCH;
        child_fail(errpipe, "user", user,
                   unknown ? "no such user in the passwd database" : strerror(errno));
    }
    uid = pw ? pw->pw_uid : (uid_t)numeric;
    gid = pw ? pw->pw_gid : (gid_t)numeric;
    if (pw ? initgroups(pw->pw_name, gid) < 0 : setgroups(0, NULL) < 0)
        child_fail(errpipe, "user", "setgroups", strerror(errno));
    if (setgid(gid) < 0)
        child_fail(errpipe, "user", "setgid", strerror(errno));
    if (setuid(uid) < 0)
        child_fail(errpipe, "user", "setuid", strerror(errno));
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

/* The workload's stdio, opened before any namespace or root change: the paths are the host's. */
static void open_stdio(const struct options *opts, int errpipe)
{
    open_as(errpipe, "stdin", "/dev/null", O_RDONLY, STDIN_FILENO);
    open_as(errpipe, "stdout", opts->stdout_path, O_WRONLY | O_APPEND | O_CREAT, STDOUT_FILENO);
    open_as(errpipe, "stderr", opts->stderr_path, O_WRONLY | O_APPEND | O_CREAT, STDERR_FILENO);
}

static void exec_workload(const struct options *opts, int errpipe)
{
    if (opts->cwd != NULL && chdir(opts->cwd) < 0)
        child_fail(errpipe, "cwd", opts->cwd, strerror(errno));
    if (opts->user != NULL)
        become_user(errpipe, opts->user);
    close_other_fds(errpipe);
    reset_signals();
    environ = opts->env; /* execvp searches the workload's PATH, not ours */
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
    close(errpipe); /* the workload's copy alone tells the supervisor whether exec succeeded */
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
 * the launch instead of being lost at exit, and so that the name survives chdir("/"). */
static int open_status_dir(const char *status_file, const char **base)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(status_file, '/');
    *base = slash ? slash + 1 : status_file;
    if (**base == '\0')
        usage_error("--status-file names a directory:", status_file);
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

int main(int argc, char **argv)
{
    char *env[argc + 2], *cgroups[argc + 2], *bind_sources[argc + 2], *bind_targets[argc + 2];
    int bind_read_only[argc + 2];
    struct options opts;
    const char *base;
    char line[128];
    int wstatus, len;
    struct timespec finished;
    pid_t pid;

    int devnull = open_devnull();
    ignore_signals();
    parse_args(argc, argv, &opts, env, cgroups, bind_sources, bind_targets, bind_read_only);
    int dirfd = open_status_dir(opts.status_file, &base);
    int statuspipe[2];
    if (pipe2(statuspipe, O_CLOEXEC) < 0)
        fail("pipe", NULL, errno);
    pid = launch(&opts, statuspipe[1]);
    close(statuspipe[1]);

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
